"""exar-edge: the command line of exar.edge (a thin layer over exar.edge.session)."""

from __future__ import annotations

from pathlib import Path

import click

from exar import constants
from exar.clikit import debug_option, echo_json, entry_point, json_option, open_run, run_option, version_option

EXIT_CODES = """\b
Exit codes: 0 done; 1 a problem with the input or the run (one line on stderr, naming
the file, field or line; --debug shows the traceback); 2 wrong usage; 130 interrupted
(batch output stays valid and resumes)."""


@click.group(name="exar-edge", epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@version_option
@debug_option
def cli():
    """Answer questions on a CPU with the EXAR loop: answer, validate, re-answer excluding every
    rejected answer, up to --max-rounds; every answer is checked by the model's own validator.

    \b
    exar-edge ask "question" [--context TEXT] [--trace] [--json]
    exar-edge batch questions.jsonl -o answers.jsonl      (resumes an interrupted file)
    exar-edge chat                                        (:trace, :quit)
    exar-edge index DOCS... -o INDEX ; exar-edge ask --docs INDEX "question"

    Needs a run exported with `exar-export --quant q4_0` (GGUF files).
    """


def runtime_options(command):
    """The options every command shares: which run and GGUFs, llama.cpp settings, loop settings."""
    options = [
        run_option,
        click.option("--mode", type=click.Choice(["adapters", "merged"]), default=None,
                     help="adapters: one base GGUF + three LoRA GGUFs switched per call (less memory; "
                          "the default when exported); merged: one GGUF per role."),
        click.option("--quant", default=None, help="GGUF variant, e.g. q4_0, q8_0, f16 (default: the run's first "
                                                   "exported quant)."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads (default: the physical cores)."),
        click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=constants.EDGE_CONTEXT,
                     show_default=True, help="llama.cpp context in tokens, shared by the roles' cached prompts."),
        click.option("--seed", type=int, default=constants.SEED, show_default=True, help="Sampling seed."),
        click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
                     help="Answer temperature (0 = greedy); a repeated answer is resampled hotter."),
        click.option("--max-rounds", type=click.IntRange(min=1), default=constants.MAX_ROUNDS, show_default=True,
                     help="Answers to try (the first, then re-answers), each validated."),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=constants.MAX_NEW_TOKENS,
                     show_default=True, help="Longest answer, in tokens."),
        click.option("--on-reject", type=click.Choice(list(constants.ON_REJECT)), default="best", show_default=True,
                     help="When no answer passes: return the best-scored one, or abstain."),
        click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None,
                     help="Accept when p(CORRECT) >= this (default: the run's calibrated validator threshold, "
                          f"else {constants.VALIDATOR_THRESHOLD})."),
        click.option("--verbose", is_flag=True, help="Show llama.cpp's own log on stderr."),
        click.option("--docs", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="INDEX",
                     help="Answer from your documents: the top passages of this index (`exar-edge index`) go "
                          "into each question's context."),
        click.option("--top-k", type=click.IntRange(min=1), default=constants.TOP_K, show_default=True,
                     help="Passages retrieved per question with --docs."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _open(run_dir, mode, quant, threads, n_ctx, seed, temperature, max_rounds, max_new_tokens, on_reject,
          threshold, verbose, docs=None, top_k=constants.TOP_K):
    from exar.edge.session import open_session

    from exar.retrieval import open_index

    index = open_index(docs, warn=True) if docs is not None else None
    return open_session(open_run(run_dir), mode=mode, quant=quant, threads=threads, n_ctx=n_ctx, verbose=verbose,
                        seed=seed, temperature=temperature, max_rounds=max_rounds, max_new_tokens=max_new_tokens,
                        on_reject=on_reject, threshold=threshold, docs=index, top_k=top_k)


@cli.command(epilog=EXIT_CODES)
@click.argument("docs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True, metavar="INDEX",
              help="Index folder to write (replaced atomically when complete).")
@click.option("--words", type=click.IntRange(min=1), default=constants.PASSAGE_WORDS, show_default=True, help="Words per passage.")
@click.option("--overlap", type=click.IntRange(min=0), default=constants.PASSAGE_OVERLAP, show_default=True,
              help="Words shared by consecutive passages of one section.")
@json_option
def index(docs, output, words, overlap, as_json):
    """Index DOCS (.txt, .md, .pdf files or folders of them) for `--docs`: BM25 over passages.

    Passages are word windows inside each Markdown section, headed by the section title; their ids
    are <file name>#<n>. The index records every document's sha256, so `ask --docs` warns when a
    document changed since. No torch, no model: it runs anywhere `exar-edge` does.
    """
    from exar.retrieval import build_index

    built = build_index(docs, output, words=words, overlap=overlap)
    if as_json:
        echo_json({"index": str(output), **{k: built.meta[k] for k in ("documents", "passages", "chunking", "retriever")}})
        return
    click.echo(f"indexed {len(built.documents)} document(s), {len(built.passages)} passages -> {output}")


@cli.command(epilog=EXIT_CODES)
@click.argument("question")
@click.option("--context", default="", help="A passage the question is about (given to the answer role).")
@click.option("--trace", is_flag=True, help="Show every round: answer, p(CORRECT), tokens, milliseconds.")
@json_option
@runtime_options
def ask(question, context, trace, as_json, **options):
    """Answer QUESTION with the EXAR loop and say how the answer was reached.

    --json prints the result object: question, answer (null when abstaining), decision
    (accepted|best|abstain), accepted, p_correct, stage_zero_answer, rounds [{round, role,
    answer, p_correct, accepted, new, resamples, tokens, ms, verdict_ms}], tokens, total_ms,
    threshold, on_reject, max_rounds, mode, quant, threads, peak_rss_mb; with --docs also passages
    [{id, score}] (the retrieved passages, best first; their text is in context).
    """
    from exar.edge.session import check_text

    check_text(question, "the question")
    with _open(**options) as session:
        result = session.ask(question, context)
    if as_json:
        echo_json(result)
    else:
        _show(result, trace)


@cli.command(epilog=EXIT_CODES)
@click.argument("questions", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Answers JSONL, one line per question, appended as they are made; rerun to resume.")
@runtime_options
def batch(questions, output, **options):
    """Answer every row {"question", "context"?, "id"?} of the JSONL file QUESTIONS.

    Each output line is the `ask --json` object (plus "id" when given), so each has its own
    trace (rounds) and latency (total_ms). Rows already in OUTPUT (by id, else by question)
    are skipped, so an interrupted batch resumes where it stopped.
    """
    from exar.edge.session import answer_batch, pending_questions, read_questions

    rows = read_questions(questions)
    pending, done = pending_questions(rows, output)
    if not pending:
        click.echo(f"all {len(rows)} questions are already answered in {output}", err=True)
        return
    if done:
        click.echo(f"resuming: {done} of {len(rows)} already answered in {output}", err=True)
    with _open(**options) as session:
        answers = list(answer_batch(session, rows, output))
    accepted = sum(a["accepted"] for a in answers)
    mean_ms = sum(a["total_ms"] for a in answers) / len(answers)
    click.echo(f"{len(answers)} answered ({accepted} accepted by the validator), mean {mean_ms:.0f} ms per "
               f"question, peak RSS {answers[-1]['peak_rss_mb']:.0f} MiB -> {output}", err=True)


@cli.command(epilog=EXIT_CODES)
@runtime_options
def chat(**options):
    """Ask questions one after another. :trace toggles showing the rounds, :quit (or Ctrl-D) leaves."""
    from exar.errors import ExarError

    show_trace = False
    with _open(**options) as session:
        click.echo("exar-edge chat: type a question; :trace shows the rounds, :quit leaves.", err=True)
        while True:
            try:
                line = input("? ").strip()
            except EOFError:
                break
            if line in (":quit", ":q", ":exit"):
                break
            if line == ":trace":
                show_trace = not show_trace
                click.echo(f"trace {'on' if show_trace else 'off'}", err=True)
                continue
            if not line:
                continue
            try:
                _show(session.ask(line), show_trace)
            except ExarError as e:  # a bad question must not end the conversation
                click.echo(f"error: {e}", err=True)


SERVE_STACK = ("fastapi", "starlette", "uvicorn", "sse_starlette", "pydantic")


@cli.command(epilog=EXIT_CODES)
@click.option("--host", default=constants.SERVE_HOST, show_default=True,
              help="Address to listen on. The default serves this machine only; 0.0.0.0 serves the network "
                   "(set --api-key then).")
@click.option("--port", type=click.IntRange(0, 65535), default=constants.SERVE_PORT, show_default=True,
              help="TCP port; 0 picks a free one (the start-up line says which).")
@click.option("--api-key", envvar=constants.API_KEY_ENV, show_envvar=True, default=None,
              help="Clients must send `Authorization: Bearer KEY` (the openai client's api_key), compared in "
                   "constant time; else 401. Default: no key needed.")
@click.option("--queue-size", type=click.IntRange(min=0), default=constants.SERVE_QUEUE, show_default=True,
              help="Requests that may wait while one is being answered; beyond that, 503 with Retry-After.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.0, min_open=True),
              default=constants.SERVE_TIMEOUT_S, show_default=True,
              help="Seconds a request may wait and be answered, else 504 (a request still waiting is dropped).")
@click.option("--max-body-kib", type=click.IntRange(min=1), default=constants.SERVE_MAX_BODY_KIB, show_default=True,
              help="Largest request body in KiB, else 413.")
@runtime_options
def serve(host, port, api_key, queue_size, timeout_s, max_body_kib, run_dir, **options):
    """Serve the EXAR loop over an OpenAI-compatible HTTP API (one model in memory, answered in order).

    \b
    POST /v1/chat/completions  the last user message is the question; system and
                               earlier user messages are the context passage
    POST /v1/completions       the prompt is the question
    GET  /v1/models, GET /health
    Point a client at http://127.0.0.1:8000/v1, e.g. openai.OpenAI(base_url=..., api_key=KEY).

    `stream: true` sends the final answer as SSE chunks. Each response has an `exar` object
    beside `choices`: the loop's trace (rounds, p_correct, decision, stage_zero_answer, total_ms)
    plus queue_ms and latency_ms. Per request, the body's `exar: {max_rounds, threshold,
    on_reject}` overrides the options below; max_tokens can only lower --max-new-tokens. When the
    loop abstains, the content is "I don't know: ..." and finish_reason is "abstain".
    SIGINT/SIGTERM stop it cleanly: waiting requests get 503, the one being answered finishes.
    """
    try:
        from exar.edge.serve import ServeOptions, listen, serve as serve_session
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in SERVE_STACK:
            raise
        from exar.errors import ExarError

        raise ExarError("exar-edge serve needs the serving extra: pip install 'exar[serve]'") from None

    sock = listen(host, port)  # before the model loads: a taken port fails at once
    run = open_run(run_dir)
    serve_options = ServeOptions(model_id=run.root.name, api_key=api_key or None, queue_size=queue_size,
                                 timeout_s=timeout_s, max_body_bytes=max_body_kib * 1024)
    with sock, _open(run.root, **options) as session:
        serve_session(session, sock, serve_options, verbose=options["verbose"])


def _show(result: dict, trace: bool) -> None:
    """The answer for a person; with ``trace``, each round and what the run cost."""
    answer = result["answer"] if result["answer"] is not None else "(no answer: every candidate was rejected)"
    click.echo(answer)
    note = {"accepted": "accepted", "best": "not accepted; best-scored", "abstain": "abstained"}[result["decision"]]
    p = f", p(CORRECT) {result['p_correct']:.2f}" if result["p_correct"] is not None else ""
    click.echo(f"  [{note}{p}, {len(result['rounds'])} round(s), {result['total_ms']:.0f} ms]", err=True)
    if result.get("passages"):
        click.echo("  passages: " + ", ".join(f"{h['id']} ({h['score']:.2f})" for h in result["passages"]), err=True)
    if trace:
        for r in result["rounds"]:
            score = "not new, skipped" if r["p_correct"] is None else f"p(CORRECT) {r['p_correct']:.3f}"
            mark = "accepted" if r["accepted"] else "rejected"
            click.echo(f"  round {r['round']} {r['role']:<6} {score:<19} {mark if r['new'] else '':<8} "
                       f"{r['tokens']:>3} tok {r['ms']:>7.0f} ms  resamples {r['resamples']}  {r['answer']!r}",
                       err=True)
        click.echo(f"  {result['mode']} {result['quant']}, {result['threads']} threads, "
                   f"peak RSS {result['peak_rss_mb']:.0f} MiB", err=True)


main = entry_point(cli)
