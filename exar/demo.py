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
QUANTS = (C.DEFAULT_QUANT, "q8_0")
# gguf:f16 is left out: export's gate already holds it to transformers' logits, and on a 2-core CPU
# llama.cpp's f16 matmuls made it the slowest variant by far (247 s of the loop against 21 s for q4_0).
EVAL_VARIANTS = ("hf", "gguf:q8_0", "gguf:q4_0", "adapters:q4_0")
EDGE_ANSWERS = "edge/answers.jsonl"
TIMINGS = "demo-timings.json"


@dataclass(frozen=True)
class DemoPlan:
    """How much of the QA set, how many steps: sized to finish on a 2-core laptop.

    The full plan's choices were measured one lever at a time (bench/RESULTS.md, "The demo's
    metacognition"): DATASET+ from every train question, greedy (as the loop's first round) and two
    hot samples (wrong answers to learn from), and a validator with LoRA on every linear layer
    trained longer than the other roles. The demo skips the validation losses (a minute or more
    of forward passes per role on 2 cores): what it reports is measured on the held-out questions.
    """

    run_name: str
    questions: int | None          # None: every question of the set
    test_fraction: float
    dev_fraction: float
    steps: dict = field(default_factory=dict)   # max optimizer steps per role
    targets: dict = field(default_factory=dict)  # LoRA target modules per role (default: q/k/v/o)
    predict_pool: int | None = None             # train questions stage-zero answers for DATASET+ (None: all)
    temperatures: tuple[float, ...] = C.PREDICT_TEMPERATURES
    max_new_tokens: int = 24
    eval_limit: int | None = None               # None: every held-out question


FULL = DemoPlan("demo", questions=None, test_fraction=0.16, dev_fraction=0.15, predict_pool=None,
                steps={"answer": 30, "validator": 80, "exar": 48}, targets={"validator": "all-linear", "exar": "all-linear"},
                temperatures=(0.0, 0.7, 1.0))
FAST = DemoPlan("demo-fast", questions=80, test_fraction=0.15, dev_fraction=0.15, predict_pool=32,
                steps={"answer": 5, "validator": 5, "exar": 4}, targets={"validator": "all-linear", "exar": "all-linear"},
                temperatures=(0.0, 1.0), max_new_tokens=16, eval_limit=6)


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

        export_run(run, ExportOptions(quants=QUANTS, mode="both", outtype="f16"), echo=_quiet)
    loop = {"max_new_tokens": plan.max_new_tokens}
    with stage("edge", timings, timings_path):
        edge_rows = _edge_batch(run, loop)
    with stage("eval", timings, timings_path):
        from exar.eval.compare import CompareSettings, compare

        report = compare(run, list(EVAL_VARIANTS), name="demo", loop_overrides=loop,
                         settings=CompareSettings(what="both", limit=plan.eval_limit))
    summary = summarize(run, timings, edge_rows, report)
    print_summary(summary)
    return summary


def train_settings():
    """The demo's training settings, every role (steps and LoRA targets come from the plan): 4-bit on the CPU."""
    from exar.train.settings import TrainSettings

    return TrainSettings(bits=4, batch_size=8, grad_accum=1, max_seq_len=256, lr=1e-3, save_steps=20,
                         gradient_checkpointing=False, validation_loss=False)


def _train(run: Run, plan: DemoPlan) -> None:
    """`exar-train all` on the demo data, steps from the plan."""
    from exar.train.pipeline import DataOptions, run_all

    settings = train_settings()
    run_all(BASE, demo_data(), settings, run_dir=run.root,
            options=DataOptions(fmt="jsonl", limit=plan.questions, test_fraction=plan.test_fraction,
                                dev_fraction=plan.dev_fraction),
            role_settings={role: settings.with_(max_steps=steps, target_modules=plan.targets.get(role, C.LORA_TARGETS))
                           for role, steps in plan.steps.items()},
            predict_options={"temperatures": plan.temperatures, "max_new_tokens": plan.max_new_tokens,
                             "batch_size": 20, "limit": plan.predict_pool})


def _edge_batch(run: Run, loop: dict) -> list[dict]:
    """The edge loop (adapters mode, q4_0) over the held-out questions, resumable."""
    from exar.data import read_jsonl
    from exar.edge.session import answer_batch, open_session

    questions = [{"id": i, "question": r["question"], "context": r.get("context", "")}
                 for i, r in enumerate(read_jsonl(run.path(C.TEST_SPLIT)))]
    out = run.path(EDGE_ANSWERS)
    with open_session(run, mode="adapters", quant=C.DEFAULT_QUANT, **loop) as session:
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
    """What the demo measured, read back from the run's files and the eval report (nothing scripted)."""
    settings = run.settings
    variants = {v["name"]: v for v in report["variants"]}
    reference = variants[report["reference_variant"]]
    meta = reference["metacognition"]
    return {
        "run": str(run.root),
        "timings_s": timings,
        "data": settings.get("data", {}).get("counts", {}),
        "dataset_plus": settings.get("annotate", {}).get("counts", {}),
        "calibration": (settings.get("validator") or {}).get("calibration", {}),
        "edge": {"questions": len(edge_rows), "decisions": _count(r["decision"] for r in edge_rows),
                 "rounds_mean": _mean(len(r["rounds"]) for r in edge_rows),
                 "ms_mean": _mean(r["total_ms"] for r in edge_rows)},
        "metacognition": {
            "variant": reference["name"], "n": meta["n"], "right": meta["right"],
            **{key: meta["figures"][key] for key in ("auroc", "logprob_auroc", "auroc_minus_logprob", "ece",
                                                     "acceptance_rate", "stage_zero_accuracy", "loop_accuracy",
                                                     "accuracy_at_0.7", "selective_gain_at_0.7")},
            "transitions": meta["transitions"],
            "degenerate_threshold": meta["degenerate_threshold"],
        },
        "stage_zero_vs_loop": {
            "variant": reference["name"],
            "em_stage_zero": reference["mean"].get("em_lower"),
            "em_loop": reference["mean"].get("loop_em_lower"),
            "bertscore_f_stage_zero": reference["mean"].get("bertscore_f"),
            "bertscore_f_loop": reference["mean"].get("loop_bertscore_f"),
            "loop_minus_stage_zero": reference["pipeline"]["loop_vs_stage_zero"],
        },
        "variants": [{
            "name": v["name"],
            "em_lower": v["mean"].get("em_lower"),
            "bertscore_f": v["mean"].get("bertscore_f"),
            "kl": v["mean"].get("kl"),
            "auroc": v["metacognition"]["figures"]["auroc"],
            "tokens_per_s": v["latency"]["tokens_per_s"],
            "bytes": v["bytes"],
            "sentence": v.get("sentence"),
        } for v in report["variants"]],
        "report_png": str(run.path("eval/demo/report.png")),
    }


def print_summary(summary: dict) -> None:
    t, d, e, z = summary["timings_s"], summary["data"], summary["edge"], summary["stage_zero_vs_loop"]
    m, cal = summary["metacognition"], summary["calibration"]
    tr = m["transitions"]
    threshold = f"validator threshold p(CORRECT) >= {_fmt(cal.get('threshold'))}"
    if cal:
        threshold += (f", fitted on {cal.get('answers')} dev answers ({cal.get('objective')} {_fmt(cal.get('value'))}, "
                      f"accepts {cal.get('acceptance_rate', 0):.0%})")
        if cal.get("degenerate"):
            threshold += " -- DEGENERATE: " + cal["warning"]
    lines = [
        "",
        "== exar demo: what was measured ==",
        "stage timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()) + f" (total {sum(t.values()):.0f} s)",
        f"questions: {d.get('train')} train / {d.get('dev')} dev / {d.get('test')} held out; "
        f"DATASET+ labels: {summary['dataset_plus']}",
        threshold,
        "",
        f"does the validator know? ({m['variant']}, {m['n']} held-out answers, {m['right']} right)",
        f"  validator AUROC {_ci(m['auroc'])}; the answer's own log-prob {_ci(m['logprob_auroc'])}; "
        f"difference {_ci(m['auroc_minus_logprob'], signed=True)}",
        f"  ECE {_ci(m['ece'])}; accepts {_ci(m['acceptance_rate'])} of the answers"
        + (" (degenerate threshold)" if m["degenerate_threshold"] else ""),
        f"  the loop: right->right {tr['right_right']}, right->wrong {tr['right_wrong']}, wrong->right "
        f"{tr['wrong_right']}, wrong->wrong {tr['wrong_wrong']} (net {tr['net']:+d}); accuracy "
        f"{_fmt(m['stage_zero_accuracy']['value'])} -> {_fmt(m['loop_accuracy']['value'])}",
        f"  answering the 70% it trusts most: accuracy {_ci(m['accuracy_at_0.7'])} "
        f"({_ci(m['selective_gain_at_0.7'], signed=True)} vs answering all)",
        "",
        f"edge loop, adapters:q4_0, {e['questions']} held-out questions: {e['decisions']}, "
        f"{e['rounds_mean']:.2f} rounds and {e['ms_mean']:.0f} ms per question",
        f"stage-zero vs EXAR loop ({z['variant']}): exact match {_fmt(z['em_stage_zero'])} -> {_fmt(z['em_loop'])}, "
        f"BERTScore F1 {_fmt(z['bertscore_f_stage_zero'])} -> {_fmt(z['bertscore_f_loop'])} "
        f"(difference {z['loop_minus_stage_zero']['diff']:+.3f} [{z['loop_minus_stage_zero']['low']:+.3f}, "
        f"{z['loop_minus_stage_zero']['high']:+.3f}])",
        "",
        f"{'variant':<15}{'exact match':>12}{'BERTScore F1':>14}{'KL vs hf':>10}{'AUROC':>8}{'tokens/s':>10}{'size MB':>10}",
    ]
    for v in summary["variants"]:
        lines.append(f"{v['name']:<15}{_fmt(v['em_lower']):>12}{_fmt(v['bertscore_f']):>14}{_fmt(v['kl']):>10}"
                     f"{_fmt(v['auroc']['value']):>8}{v['tokens_per_s']:>10.1f}{v['bytes'] / 2**20:>10.1f}")
    lines += [""] + [v["sentence"] for v in summary["variants"] if v["sentence"]]
    lines += ["", f"chart: {summary['report_png']}"]
    print("\n".join(lines), flush=True)


def _ci(figure: dict, signed: bool = False) -> str:
    if figure.get("value") is None:
        return "n/a"
    sign = "+" if signed else ""
    if figure.get("low") is None:
        return f"{figure['value']:{sign}.2f}"
    return f"{figure['value']:{sign}.2f} [{figure['low']:{sign}.2f}, {figure['high']:{sign}.2f}]"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _count(values) -> dict:
    counts: dict = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _quiet(text: str) -> None:
    say(f"  {text}")
