"""exar-edge serve: the real server (uvicorn on a free loopback port) talked to with the real openai client.

The runtime uses the tiny run's f32 base + LoRAs: the server's behaviour does not depend on the
quant, and f32 keeps greedy answers identical whatever ran before on the runtime's KV caches.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from exar.edge.serve import (ABSTAIN_FINISH_REASON, ABSTAIN_MESSAGE, Server, ServeOptions, create_app,  # noqa: E402
                             listen, url_of)
from exar.edge.session import open_session  # noqa: E402

KEY = "test-key-0123"
MODEL = "tiny"
SESSION_OPTIONS = dict(quant="f32", threads=1, max_new_tokens=6)
QUESTIONS = ["What is the capital of France?", "Who wrote the book?", "Which planet is the largest?",
             "What is the symbol of gold?", "How many metres in a kilometre?", "Which river is the longest?",
             "What is the currency of Japan?", "Which language is spoken in Spain?", "What colour is the sky?",
             "Who was the first?", "Where is the ocean?", "When was it written?"]


@contextmanager
def serving(session, **options):
    """The real server over ``session`` in a thread, on a free loopback port; stopped after."""
    app = create_app(session, ServeOptions(model_id=MODEL, **options))
    sock = listen("127.0.0.1", 0)
    server = Server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield SimpleNamespace(url=url_of(sock), queue=app.state.queue, session=session)
    finally:
        server.should_exit = True
        thread.join(30)
        app.state.queue.close()
        sock.close()


def client(api, key: str = KEY, **options) -> "openai.OpenAI":
    return openai.OpenAI(base_url=api.url, api_key=key, max_retries=0, timeout=options.pop("timeout", 60), **options)


def ask(api, question: str, **options):
    return client(api).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                               **options)


def direct(api, question: str, context: str = "", **settings) -> dict:
    """What ``exar-edge ask`` answers on the same runtime (through the server's worker, never beside it)."""
    session = replace(api.session, settings=replace(api.session.settings, **settings))
    future, _ = api.queue.submit(session.ask, question, context)
    return future.result(timeout=60)


def post_raw(api, path: str, data, headers: dict) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(api.url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def session(exported_run):
    with open_session(exported_run, **SESSION_OPTIONS) as session:
        yield session


@pytest.fixture(scope="module")
def api(session):
    with serving(session, api_key=KEY, queue_size=8, timeout_s=60, max_body_bytes=64 * 1024) as api:
        yield api


@pytest.fixture
def own_api(exported_run):
    """A server on its own session, for tests that change how it is configured."""
    @contextmanager
    def start(**options):
        with open_session(exported_run, **SESSION_OPTIONS) as session, serving(session, **options) as api:
            yield api
    return start


def test_chat_completion_is_the_loops_answer_with_its_trace(api):
    context = "France is a country in Europe. Its capital is Paris."
    expected = direct(api, QUESTIONS[0], context, threshold=0.0)
    completion = client(api).chat.completions.create(
        model="anything", messages=[{"role": "system", "content": context}, {"role": "user", "content": QUESTIONS[0]}],
        extra_body={"exar": {"threshold": 0.0}})
    trace = completion.model_extra["exar"]
    choice = completion.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", expected["answer"], "stop")
    assert completion.object == "chat.completion" and completion.model == MODEL and completion.id.startswith("chatcmpl-")
    assert (trace["decision"], trace["threshold"], len(trace["rounds"])) == ("accepted", 0.0, 1)  # 0 accepts round 1
    assert trace["stage_zero_answer"] == trace["rounds"][0]["answer"] == expected["answer"] == trace["answer"]
    assert trace["rounds"][0]["p_correct"] == pytest.approx(expected["rounds"][0]["p_correct"], abs=1e-4)
    assert "question" not in trace and "context" not in trace and (trace["mode"], trace["quant"]) == ("adapters", "f32")
    assert trace["served"] == trace["request"] >= 2  # nothing was dropped; direct() was served first
    assert 0 <= trace["queue_ms"] < trace["latency_ms"] and trace["latency_ms"] >= trace["total_ms"]
    assert completion.usage.completion_tokens == trace["tokens"] == expected["tokens"]
    assert completion.usage.prompt_tokens > 0 and completion.usage.total_tokens == completion.usage.prompt_tokens + trace["tokens"]


def test_earlier_user_messages_are_context_and_text_parts_are_read(api):
    expected = direct(api, QUESTIONS[1], "Part one.\n\nAn earlier question?")
    completion = client(api).chat.completions.create(model=MODEL, messages=[
        {"role": "system", "content": [{"type": "text", "text": "Part "}, {"type": "text", "text": "one."}]},
        {"role": "user", "content": "An earlier question?"},
        {"role": "assistant", "content": "An earlier answer (not used)."},
        {"role": "user", "content": QUESTIONS[1]}])
    assert completion.choices[0].message.content == expected["answer"]
    assert completion.model_extra["exar"]["rounds"][0]["answer"] == expected["rounds"][0]["answer"]


def test_streamed_chat_sends_the_same_answer_in_chunks(api):
    plain = ask(api, QUESTIONS[2])
    chunks = list(ask(api, QUESTIONS[2], stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(d.content or "" for d in deltas) == plain.choices[0].message.content
    assert len([d for d in deltas if d.content]) == len(plain.choices[0].message.content.split())  # one per word
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop" and finals[0].model_extra["exar"]["decision"]
    assert finals[0].model_extra["exar"]["answer"] == plain.model_extra["exar"]["answer"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_completions_plain_and_streamed(api):
    expected = direct(api, QUESTIONS[3], max_new_tokens=3)
    completion = client(api).completions.create(model=MODEL, prompt=QUESTIONS[3], max_tokens=3)
    assert completion.object == "text_completion" and completion.choices[0].text == expected["answer"]
    assert all(r["tokens"] <= 3 * (r["resamples"] + 1) for r in completion.model_extra["exar"]["rounds"])
    streamed = list(client(api).completions.create(model=MODEL, prompt=[QUESTIONS[3]], max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected["answer"]
    assert streamed[-1].choices[0].finish_reason == "stop" and streamed[-1].model_extra["exar"]["max_rounds"] == 3


def test_per_request_settings_abstain_best_and_ceilings(api):
    abstain = ask(api, QUESTIONS[4], extra_body={"exar": {"max_rounds": 2, "threshold": 1.0, "on_reject": "abstain"}})
    trace = abstain.model_extra["exar"]
    assert (abstain.choices[0].finish_reason, abstain.choices[0].message.content) == (ABSTAIN_FINISH_REASON,
                                                                                      ABSTAIN_MESSAGE)
    assert (trace["decision"], trace["answer"], trace["max_rounds"], len(trace["rounds"])) == ("abstain", None, 2, 2)
    best = ask(api, QUESTIONS[4], extra_body={"exar": {"max_rounds": 2, "threshold": 1.0, "on_reject": "best"}})
    rounds = best.model_extra["exar"]["rounds"]
    assert best.model_extra["exar"]["decision"] == "best" and best.choices[0].finish_reason == "stop"
    assert best.choices[0].message.content == max((r for r in rounds if r["new"]), key=lambda r: r["p_correct"])["answer"]
    assert [r["answer"] for r in rounds] == [r["answer"] for r in trace["rounds"]]
    # max_tokens lowers the server's --max-new-tokens (6) but never raises it
    long = ask(api, QUESTIONS[5], max_tokens=1000, extra_body={"exar": {"threshold": 1.0, "max_rounds": 1}})
    assert long.model_extra["exar"]["rounds"][0]["tokens"] <= 6 * (long.model_extra["exar"]["rounds"][0]["resamples"] + 1)
    # temperature and seed reach the loop: the same seed gives the same sample, as `ask` does
    sampled = [ask(api, QUESTIONS[6], temperature=1.5, seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1] == direct(api, QUESTIONS[6], temperature=1.5, seed=7)["answer"]


@pytest.mark.parametrize("request_fields, param, message", [
    ({"extra_body": {"exar": {"max_rounds": 0}}}, "exar.max_rounds", "Input should be greater than or equal to 1"),
    ({"extra_body": {"exar": {"max_rounds": 11}}}, "exar.max_rounds", "Input should be less than or equal to 10"),
    ({"extra_body": {"exar": {"max_rounds": "2"}}}, "exar.max_rounds", "Input should be a valid integer"),
    ({"extra_body": {"exar": {"max_rounds": True}}}, "exar.max_rounds", "Input should be a valid integer"),
    ({"extra_body": {"exar": {"threshold": 1.5}}}, "exar.threshold", "Input should be less than or equal to 1"),
    ({"extra_body": {"exar": {"on_reject": "maybe"}}}, "exar.on_reject", "Input should be 'best' or 'abstain'"),
    ({"extra_body": {"exar": {"treshold": 0.5}}}, "exar.treshold",
     "unknown setting (known: max_rounds, threshold, on_reject)"),
    ({"extra_body": {"exar": [1]}}, "exar", "Input should be a valid dictionary"),
    ({"n": 2}, "n", "Input should be 1"),
    ({"temperature": -1}, "temperature", "Input should be greater than or equal to 0"),
    ({"max_tokens": 0}, "max_tokens", "Input should be greater than or equal to 1"),
    ({"messages": []}, "messages", "List should have at least 1 item"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages",
     "no user message (the last user message is the question)"),
    ({"messages": [{"role": "user", "content": "   "}]}, None, "'messages.0.content' (the question) is empty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content", "must be a string or a list of text parts"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "Input should be 'system', 'developer'"),
])
def test_bad_fields_are_400_with_one_message(api, request_fields, param, message):
    fields = {"model": MODEL, "messages": [{"role": "user", "content": "q?"}], **request_fields}
    answered_before = api.queue.served
    with pytest.raises(openai.BadRequestError) as error:
        client(api).chat.completions.create(**fields)
    assert error.value.status_code == 400 and error.value.body["param"] == param
    assert message in error.value.body["message"] and "\n" not in error.value.body["message"]
    assert error.value.body["type"] == "invalid_request_error" and api.queue.served == answered_before


def test_bad_bodies_and_unknown_paths(api):
    auth = {"Authorization": f"Bearer {KEY}"}
    json_headers = {**auth, "Content-Type": "application/json"}
    cases = [
        (b'{"messages": [', json_headers, 400, "the body is not valid JSON"),
        (b"", json_headers, 400, "the request has no JSON body"),
        (b"[1, 2]", json_headers, 400, "the body must be a JSON object"),
        (b'{"messages": [{"role": "user", "content": "q"}]}', auth, 400, "Content-Type: application/json"),
    ]
    for data, headers, status, message in cases:
        code, _, body = post_raw(api, "/chat/completions", data, headers)
        assert (code, message in json.loads(body)["error"]["message"]) == (status, True), body
    big = json.dumps({"prompt": "x" * (64 * 1024)}).encode()
    code, _, body = post_raw(api, "/completions", big, json_headers)  # announced length: refused before reading
    assert (code, body) == (413, b"Content Too Large")
    code, _, body = post_raw(api, "/completions", iter([big[:1000], big[1000:]]), json_headers)  # chunked
    assert code == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    code, _, body = post_raw(api, "/embeddings", b"{}", json_headers)
    assert code == 404 and json.loads(body)["error"]["message"] == "no such endpoint: POST /v1/embeddings"


def test_api_key_models_and_health(api):
    with pytest.raises(openai.AuthenticationError) as error:
        client(api, key="wrong-key").models.list()
    assert error.value.status_code == 401 and error.value.body["code"] == "invalid_api_key"
    code, headers, body = post_raw(api, "/chat/completions", b"{}", {"Content-Type": "application/json"})
    assert code == 401 and headers["www-authenticate"] == "Bearer" and b"Authorization: Bearer KEY" in body
    models = client(api).models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [(MODEL, "model", "exar")]
    with urllib.request.urlopen(api.url.removesuffix("/v1") + "/health", timeout=10) as response:  # no key needed
        health = json.loads(response.read())
    assert (health["status"], health["model"], health["queue_size"], health["waiting"]) == ("ok", MODEL, 8, 0)


def test_full_queue_answers_503_with_retry_after(own_api):
    with own_api(queue_size=1) as api, ThreadPoolExecutor(1) as pool:
        gate = threading.Event()
        _, blocker = api.queue.submit(gate.wait)  # the runtime is busy ...
        waiting = pool.submit(ask, api, QUESTIONS[0])  # ... one request waits ...
        while api.queue.waiting < 1 or blocker.started is None:
            time.sleep(0.01)
        with pytest.raises(openai.InternalServerError) as error:  # ... and the next finds the queue full
            ask(api, QUESTIONS[1])
        gate.set()
        assert error.value.status_code == 503 and error.value.body["code"] == "queue_full"
        assert int(error.value.response.headers["retry-after"]) >= 1
        assert waiting.result(timeout=60).choices[0].finish_reason in ("stop", ABSTAIN_FINISH_REASON)
        assert ask(api, QUESTIONS[1]).model_extra["exar"]["served"] == 3


def test_timeout_answers_504_and_drops_the_waiting_request(own_api):
    with own_api(timeout_s=0.5) as api:
        gate = threading.Event()
        api.queue.submit(gate.wait)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as error:
            ask(api, QUESTIONS[0])
        waited = time.monotonic() - started
        gate.set()
        assert error.value.status_code == 504 and error.value.body["code"] == "timeout"
        assert "while it waited in the queue" in error.value.body["message"] and 0.5 <= waited < 10
        answered = ask(api, QUESTIONS[0]).model_extra["exar"]
        assert (api.queue.dropped, answered["request"], answered["served"]) == (1, 3, 2)  # request 2 never ran


def test_concurrent_clients_are_all_answered_in_order(api):
    expected = {q: direct(api, q)["answer"] for q in QUESTIONS}
    gate = threading.Event()
    api.queue.submit(gate.wait)  # hold the runtime until every client has a request waiting

    def one_client(questions):
        own = client(api)
        return [(q, own.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}]))
                for q in questions]

    with ThreadPoolExecutor(4) as pool:
        batches = [pool.submit(one_client, QUESTIONS[i::4]) for i in range(4)]
        deadline = time.monotonic() + 30
        while api.queue.waiting < 4:  # four clients at once, all admitted
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.set()
        answered = [pair for batch in batches for pair in batch.result(timeout=120)]
    assert len(answered) == len(QUESTIONS)
    assert {q: c.choices[0].message.content for q, c in answered} == expected  # no request got another's answer
    traces = sorted((c.model_extra["exar"] for _, c in answered), key=lambda t: t["request"])
    assert [t["served"] - traces[0]["served"] for t in traces] == list(range(len(QUESTIONS)))  # one at a time, FIFO


def test_importing_the_server_needs_no_torch():
    code = "import sys, exar.edge.cli, exar.edge.serve; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_serve_help_explains_every_option_and_a_taken_port_fails_at_once(capsys):
    from exar.edge.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for option in ("--host", "--port", "--api-key", "EXAR_API_KEY", "--queue-size", "--timeout", "--max-body-kib",
                   "--run", "--mode", "--quant", "--max-rounds", "--threshold", "--on-reject", "abstain"):
        assert option in out
    taken = listen("127.0.0.1", 0)
    with taken, pytest.raises(SystemExit) as exit_:
        main(["serve", "--run", "/nonexistent", "--port", str(taken.getsockname()[1])])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("error: cannot listen on 127.0.0.1:") and err.count("\n") == 1


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_command_binds_loopback_and_stops_cleanly(exported_run, stop):
    env = {**os.environ, "EXAR_API_KEY": KEY}
    argv = [sys.executable, "-c", "from exar.edge.cli import main; main()", "serve", "--run", str(exported_run.root),
            "--port", "0", "--quant", "f32", "--threads", "1", "--max-new-tokens", "4"]
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not any("Ctrl-C stops" in line for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        start_line = next(line for line in lines if "Ctrl-C stops" in line)
        assert "at http://127.0.0.1:" in start_line and "this machine only" in start_line
        assert "API key required" in start_line and KEY not in start_line
        url = start_line.split(" at ")[1].split(",")[0]
        api = SimpleNamespace(url=url)
        assert ask(api, QUESTIONS[0]).choices[0].finish_reason in ("stop", ABSTAIN_FINISH_REASON)
        with pytest.raises(openai.AuthenticationError):
            client(api, key="wrong").models.list()
        process.send_signal(stop)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(10)
    assert lines[-1].strip() == f"exar-edge serve: stopped on {stop.name}; 1 requests answered, 0 dropped"
    assert not any("Traceback" in line for line in lines) and process.stdout.read() == ""
