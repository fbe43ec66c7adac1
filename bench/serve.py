"""Load benchmark of `exar-edge serve` against `exar-edge batch` on the same questions, in one run.

Loopback only, bounded in count (--requests) and time (--max-seconds per phase). Each repeat runs,
with the same run, GGUF and runtime options:

  1. batch: `exar-edge batch` over the N questions, and over 1 question (two processes); its
     answering rate is (N - 1) / (T_N - T_1), so process start-up and model load cancel out;
  2. serve: `exar-edge serve --port 0` (its own process, 127.0.0.1), 10 warm-up requests, then C
     concurrent clients (the real `openai` package, one client per thread) send the same N
     questions: requests/s over the whole load, latency p50/p95 as the clients see it, and the
     server's RSS right after start-up, after the warm-up and after the N requests (psutil).

Reported: serve requests/s / batch questions/s (goal >= 0.9), RSS after N / at start and / after the
warm-up (goal <= 1.05; the first requests load code paths once, a leak grows after that too),
how many served answers equal batch's (greedy decoding: all should), and the spread over repeats.

    python bench/serve.py                                # the tests' tiny run, built in bench/out/serve
    python bench/serve.py --run models/<run> --quant q4_0 --requests 200 --clients 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EDGE_CLI = [sys.executable, "-c", "from exar.edge.cli import main; main()"]
TARGETS = {"serve/batch throughput": (">=", 0.9), "RSS after/at start": ("<=", 1.05),
           "RSS after/after warm-up": ("<=", 1.05)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="an exported run (default: build the tests' tiny run)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "serve")
    parser.add_argument("--quant", default="f32", help="GGUF variant both commands load")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads of both commands")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1000, help="N: questions per phase")
    parser.add_argument("--clients", type=int, default=4, help="C: concurrent HTTP clients")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop a phase after this long")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    run = args.run or tiny_run(args.out / "run")
    questions = write_questions(args.out / "questions.jsonl", args.requests)
    write_questions(args.out / "one.jsonl", 1)
    runtime = ["--run", str(run), "--quant", args.quant, "--threads", str(args.threads),
               "--max-new-tokens", str(args.max_new_tokens)]
    repeats = []
    for repeat in range(args.repeats):
        batch = batch_rate(args.out, runtime, args.requests, args.max_seconds)
        served = serve_load(runtime, questions, args.clients, args.max_seconds)
        served["same_answers"] = sum(served["answers"][row_id] == answer for row_id, answer in batch["answers"].items()
                                     if row_id in served["answers"])
        repeats.append({"batch": {k: v for k, v in batch.items() if k != "answers"},
                        "serve": {k: v for k, v in served.items() if k != "answers"}})
        print(f"repeat {repeat + 1}/{args.repeats}: batch {batch['rate']:.1f} q/s, serve {served['rate']:.1f} req/s "
              f"(p50 {served['p50_ms']:.1f} ms, p95 {served['p95_ms']:.1f} ms), RSS {served['rss_start_mb']:.1f} -> "
              f"{served['rss_end_mb']:.1f} MiB", flush=True)
    report(repeats, args, run)


# --- inputs -------------------------------------------------------------------------------------

def tiny_run(where: Path) -> Path:
    """The edge tests' exported run (random tiny Llama + three random LoRAs), built once."""
    if (where / "manifest.json").is_file():
        return where
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "edge")]
    from edge_run import build_exported_run
    from tiny import build_tiny_llama

    base = build_tiny_llama(where.parent / "tiny-llama")
    return build_exported_run(where, base).root


def write_questions(path: Path, count: int) -> list[dict]:
    """``count`` rows {id, question}, exar's demo questions in turn (ids keep repeats apart for batch)."""
    from importlib.resources import files

    source = [json.loads(line)["question"] for line in
              files("exar.demo_data").joinpath("demo_qa.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [{"id": i, "question": source[i % len(source)]} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return rows


# --- batch --------------------------------------------------------------------------------------

def batch_rate(out: Path, runtime: list[str], count: int, max_seconds: float) -> dict:
    """Questions/s of `exar-edge batch` once loaded: (N - 1) / (T_N - T_1)."""
    times = {}
    for name, rows in (("questions", count), ("one", 1)):
        answers = out / f"{name}.answers.jsonl"
        answers.unlink(missing_ok=True)
        start = time.perf_counter()
        subprocess.run([*EDGE_CLI, "batch", str(out / f"{name}.jsonl"), "-o", str(answers), *runtime], check=True,
                       capture_output=True, timeout=max_seconds)
        times[rows] = time.perf_counter() - start
    lines = [json.loads(line) for line in (out / "questions.answers.jsonl").read_text().splitlines()]
    return {"seconds_n": times[count], "seconds_1": times[1], "rate": (count - 1) / (times[count] - times[1]),
            "answers": {row["id"]: row["answer"] for row in lines}}


# --- serve --------------------------------------------------------------------------------------

def serve_load(runtime: list[str], questions: list[dict], clients: int, max_seconds: float) -> dict:
    """The server under ``clients`` concurrent openai clients sending ``questions``, once each."""
    import openai
    import psutil

    process = subprocess.Popen([*EDGE_CLI, "serve", "--port", "0", "--queue-size", str(clients), *runtime],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        url = _started(process, timeout=120)
        server = psutil.Process(process.pid)
        rss_start = server.memory_info().rss / 2**20

        def new_client():
            return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=max_seconds)

        def ask(client, row) -> tuple[int, str | None, float]:
            start = time.perf_counter()
            completion = client.chat.completions.create(model="exar", messages=[{"role": "user",
                                                                                  "content": row["question"]}])
            return row["id"], completion.model_extra["exar"]["answer"], (time.perf_counter() - start) * 1000.0

        warm = new_client()
        for row in questions[:10]:
            ask(warm, row)
        rss_warm = server.memory_info().rss / 2**20
        pending = iter(questions)
        lock = threading.Lock()
        deadline = time.perf_counter() + max_seconds

        def one_client() -> list[tuple[int, str | None, float]]:
            client, done = new_client(), []
            while time.perf_counter() < deadline:
                with lock:
                    row = next(pending, None)
                if row is None:
                    break
                done.append(ask(client, row))
            return done

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = [r for part in pool.map(lambda _: one_client(), range(clients)) for r in part]
        wall = time.perf_counter() - start
        rss_end = server.memory_info().rss / 2**20
        latencies = sorted(r[2] for r in results)
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return {"requests": len(results), "seconds": wall, "rate": len(results) / wall,
            "p50_ms": _quantile(latencies, 0.50), "p95_ms": _quantile(latencies, 0.95),
            "rss_start_mb": rss_start, "rss_warm_mb": rss_warm, "rss_end_mb": rss_end, "exit_code": exit_code,
            "answers": {row_id: answer for row_id, answer, _ in results}}


def _started(process: subprocess.Popen, timeout: float) -> str:
    """The URL from the server's start-up line."""
    deadline = time.monotonic() + timeout
    for line in process.stderr:
        if "Ctrl-C stops" in line:
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # keep the pipe drained
            return line.split(" at ")[1].split(",")[0]
        if time.monotonic() > deadline:
            break
    raise SystemExit(f"the server did not start (exit code {process.poll()})")


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


# --- the report ---------------------------------------------------------------------------------

def report(repeats: list[dict], args, run: Path) -> None:
    ratios = {"serve/batch throughput": [r["serve"]["rate"] / r["batch"]["rate"] for r in repeats],
              "RSS after/at start": [r["serve"]["rss_end_mb"] / r["serve"]["rss_start_mb"] for r in repeats],
              "RSS after/after warm-up": [r["serve"]["rss_end_mb"] / r["serve"]["rss_warm_mb"] for r in repeats]}
    load = os.getloadavg()
    print(f"\nexar serve bench: {run}, {args.quant}, {args.threads} llama.cpp thread(s), {args.clients} clients, "
          f"{args.requests} requests, max {args.max_new_tokens} new tokens, {args.repeats} repeats")
    for r in repeats:
        s, b = r["serve"], r["batch"]
        print(f"  serve {s['requests']} req in {s['seconds']:.1f} s = {s['rate']:.2f} req/s, latency p50 "
              f"{s['p50_ms']:.1f} ms p95 {s['p95_ms']:.1f} ms; batch {b['rate']:.2f} q/s ({b['seconds_n']:.1f} s for N, "
              f"{b['seconds_1']:.1f} s for 1); RSS {s['rss_start_mb']:.1f} / {s['rss_warm_mb']:.1f} / "
              f"{s['rss_end_mb']:.1f} MiB (start / warm / end); same answers as batch {s['same_answers']}/"
              f"{s['requests']}; server exit {s['exit_code']}")
    for name, values in ratios.items():
        sense, target = TARGETS[name]
        median = statistics.median(values)
        met = median >= target if sense == ">=" else median <= target
        print(f"  {name:<24} median {median:.3f} (min {min(values):.3f}, max {max(values):.3f})   "
              f"target {sense} {target}: {'met' if met else 'NOT met'}")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, {datetime.now(timezone.utc):%Y-%m-%d}")
    if args.json:
        args.json.write_text(json.dumps({"repeats": repeats, "ratios": ratios, "load": load}, indent=2) + "\n")


if __name__ == "__main__":
    main()
