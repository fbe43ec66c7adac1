"""exar demo: the whole pipeline on the built-in SmolLM2-135M-Instruct and exar's own QA set, CPU only.

train (4-bit on CPU) -> export (q4_0, merged and adapters) -> edge batch on the held-out questions
-> eval (hf vs gguf:f16 vs gguf:q4_0 vs adapters:q4_0) -> a summary of what was measured. Each
stage skips what the run's manifest already holds, so a rerun resumes where the last one stopped.
This module is the composition root: the one place that imports every stage.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from exar import constants as C
from exar.rundir import Run, atomic_write_json, models_dir

BASE = "smollm2-135m-instruct"
EVAL_VARIANTS = ("hf", "gguf:f16", "gguf:q4_0", "adapters:q4_0")
EDGE_ANSWERS = "edge/answers.jsonl"
TIMINGS = "demo-timings.json"


@dataclass(frozen=True)
class DemoPlan:
    """How much of the QA set, how many steps: sized to finish on a 2-core laptop."""

    run_name: str
    questions: int | None          # None: every question of the set
    test_fraction: float
    steps: dict = field(default_factory=dict)   # max optimizer steps per role
    temperatures: tuple[float, ...] = C.PREDICT_TEMPERATURES
    max_new_tokens: int = 24
    eval_limit: int | None = None


FULL = DemoPlan("demo", questions=None, test_fraction=0.1,
                steps={"answer": 60, "validator": 60, "exar": 40})
FAST = DemoPlan("demo-fast", questions=120, test_fraction=0.15,
                steps={"answer": 12, "validator": 12, "exar": 8},
                temperatures=(0.1, 0.8), max_new_tokens=16, eval_limit=12)


def demo_data() -> Path:
    """The QA set that ships inside exar (see exar/demo_data/README.md)."""
    return Path(str(importlib.resources.files("exar.demo_data") / "demo_qa.jsonl"))


def run_demo(fast: bool = False, run_dir: str | Path | None = None) -> dict:
    """Run every stage on the demo plan; returns (and prints) the summary."""
    plan = FAST if fast else FULL
    run = Run.open_or_create(Path(run_dir) if run_dir else models_dir() / plan.run_name)
    timings_path = run.path(TIMINGS)
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    say(f"exar demo{' --fast' if fast else ''}: {BASE}, {run.root}")

    with stage("train", timings, timings_path):
        _train(run, plan)
    with stage("export", timings, timings_path):
        from exar.export.pipeline import ExportOptions, export_run

        export_run(run, ExportOptions(quants=(C.DEFAULT_QUANT,), mode="both", outtype="f16"), echo=_quiet)
    with stage("edge", timings, timings_path):
        edge_rows = _edge_batch(run)
    with stage("eval", timings, timings_path):
        from exar.eval.compare import compare

        report = compare(run, variants=list(EVAL_VARIANTS), what="both", name="demo", limit=plan.eval_limit)
    summary = summarize(run, timings, edge_rows, report)
    print_summary(summary)
    return summary


def _train(run: Run, plan: DemoPlan) -> None:
    from exar.train.pipeline import DataOptions, prepare_data, train_role
    from exar.train.annotate import annotate
    from exar.train.predict import predict
    from exar.train.settings import TrainSettings

    options = DataOptions(fmt="jsonl", limit=plan.questions, test_fraction=plan.test_fraction)
    prepare_data(BASE, demo_data(), run_dir=run.root, options=options)
    settings = TrainSettings(bits=4, batch_size=8, grad_accum=1, max_seq_len=256, lr=1e-3, save_steps=20,
                             gradient_checkpointing=False)
    train_role(run, "answer", settings.with_(max_steps=plan.steps["answer"]))
    predict(run, temperatures=plan.temperatures, max_new_tokens=plan.max_new_tokens, batch_size=16)
    annotate(run)
    train_role(run, "validator", settings.with_(max_steps=plan.steps["validator"]))
    train_role(run, "exar", settings.with_(max_steps=plan.steps["exar"]))


def _edge_batch(run: Run) -> list[dict]:
    """The edge loop (adapters mode, q4_0) over the held-out questions, resumable."""
    from exar.data import read_jsonl
    from exar.edge.session import answer_batch, open_session

    questions = [{"id": i, "question": r["question"], "context": r.get("context", "")}
                 for i, r in enumerate(read_jsonl(run.path(C.TEST_SPLIT)))]
    out = run.path(EDGE_ANSWERS)
    with open_session(run, mode="adapters", quant=C.DEFAULT_QUANT) as session:
        for _ in answer_batch(session, questions, out):
            pass
    return read_jsonl(out)


@contextlib.contextmanager
def stage(name: str, timings: dict, path: Path):
    """Announce a stage and record its wall time (kept across reruns in the run folder)."""
    say(f"\n== {name} ==")
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    timings[name] = round(elapsed, 1)
    atomic_write_json(path, timings)
    say(f"== {name}: {elapsed:.1f} s ==")


def summarize(run: Run, timings: dict, edge_rows: list[dict], report: dict) -> dict:
    """What the demo measured, straight from the run's files and the eval report."""
    settings = run.settings
    accepted_first = sum(1 for r in edge_rows if r["rounds"] and r["rounds"][0]["p_correct"] is not None
                         and r["decision"] == "accepted" and len(r["rounds"]) <= 2)
    sizes = {a["path"]: a["bytes"] for a in run.artifacts if a["kind"].startswith("gguf")}
    return {
        "run": str(run.root),
        "timings_s": timings,
        "data": settings.get("data", {}).get("counts"),
        "dataset_plus": {k: settings.get("annotate", {}).get(k) for k in ("counts", "human_agreement") if k},
        "validator_threshold": settings.get("validator", {}).get("threshold"),
        "edge": {"questions": len(edge_rows), "accepted_first_try": accepted_first,
                 "decisions": _count(r["decision"] for r in edge_rows)},
        "eval": report.get("summary", report),
        "gguf_bytes": sizes,
        "report_png": report.get("paths", {}).get("png"),
    }


def print_summary(summary: dict) -> None:
    say("\n== summary ==")
    say(json.dumps(summary, indent=2, default=str))


def _count(values) -> dict:
    counts: dict = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _quiet(text: str) -> None:
    say(f"  {text}")
