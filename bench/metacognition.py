"""Does a validator tell right answers from wrong ones? AUROC, ECE and balanced accuracy against two free baselines.

    python bench/metacognition.py [--demo-run models/demo] [--steps 60] [--skip-dolly]

1. The demo: the figures of a finished `exar demo` run's eval report (``eval/demo/report.json``), per
   variant: the validator on the stage-zero answers to the held-out questions.
2. The paper's 1000 dolly open_qa predictions of a fine-tuned Llama-2-7b-chat with their automatic labels
   (../shared/data/exar-seed/dolly_openqa_1000_stage0_preds.jsonl): a SmolLM2-135M-Instruct validator
   (4-bit QLoRA on the CPU, exar's own trainer) is trained on a question-disjoint 70% (15% of it held out
   as the dev slice its threshold is fitted on), then scored on the other 30%. The free baseline there is
   the mean token log-probability of each prediction under the SmolLM2 base given the answer prompt (a
   proxy: Llama-2-7b-chat's own confidence is not in the file); always-accept scores AUROC 0.5.

Every figure comes with a 95% bootstrap interval over questions (1000 resamples).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

SEED_FILE = Path(__file__).resolve().parents[2] / "shared/data/exar-seed/dolly_openqa_1000_stage0_preds.jsonl"
TEST_SHARE, DEV_SHARE = 0.3, 0.15


def _fmt(figure: dict) -> str:
    if figure["value"] is None:
        return "n/a"
    return f"{figure['value']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}]"


def demo_figures(run_dir: Path) -> list[dict]:
    report = json.loads((run_dir / "eval" / "demo" / "report.json").read_text(encoding="utf-8"))
    rows = []
    for v in report["variants"]:
        m = v["metacognition"]
        f = m["figures"]
        rows.append({"variant": v["name"], "n": m["n"], "right": m["right"], "auroc": f["auroc"], "ece": f["ece"],
                     "balanced_accuracy": f["balanced_accuracy"], "logprob_auroc": f["logprob_auroc"],
                     "auroc_minus_logprob": f["auroc_minus_logprob"], "acceptance_rate": f["acceptance_rate"]})
    return rows


def dolly_rows() -> list[dict]:
    rows = []
    for line in SEED_FILE.read_text(encoding="utf-8").splitlines():
        raw = json.loads(line)
        prediction = (raw.get("Generated_Response") or "").strip()
        if prediction and raw.get("validation") in ("CORRECT", "WRONG"):
            rows.append({"question": raw["Question"], "reference": raw["response"], "aliases": [],
                         "prediction": prediction, "label": raw["validation"], "human": raw.get("human")})
    return rows


def answer_logprobs(base_dir: str, rows: list[dict], style) -> list[float]:
    """Mean token log-probability of each prediction after the answer prompt, under the base model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exar.metrics import log_softmax
    from exar.prompts import completion_ids, render_answer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    out = []
    for row in rows:
        ids, start = completion_ids(lambda t: tokenizer(t).input_ids, render_answer(row["question"], "", style),
                                    row["prediction"])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, start - 1:len(ids) - 1].numpy()
        steps = log_softmax(logits)
        out.append(float(sum(steps[i, t] for i, t in enumerate(ids[start:])) / max(len(ids) - start, 1)))
    return out


def dolly_validator(steps: int, seed: int) -> dict:
    from exar import constants as C
    from exar.basemodel import prompt_style, resolve_base
    from exar.data import split_qa, write_jsonl
    from exar.eval.bootstrap import bootstrap_statistics
    from exar.metrics import at_threshold, auroc, ece
    from exar.prompts import CORRECT, render_validator
    from exar.rundir import Run
    from exar.train.pipeline import train_role
    from exar.train.scoring import p_correct_hf
    from exar.train.settings import TrainSettings
    from exar.train.trainer import load_model, load_tokenizer, device_plan

    rows = dolly_rows()
    pool, test = split_qa(rows, test_fraction=TEST_SHARE, seed=seed, question=lambda r: r["question"])
    train, dev = split_qa(pool, test_fraction=DEV_SHARE, seed=seed + 1, question=lambda r: r["question"])
    base = resolve_base("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        run = Run.create(Path(tmp) / "dolly")
        run.bind_base(base.to_dict())
        style = prompt_style(base.path)
        run.update_settings("prompt", style.to_dict())
        with run.writing(C.DATASET_PLUS, "dataset-plus") as path:
            write_jsonl(path, [{**r, "split": "train"} for r in train] + [{**r, "split": "dev"} for r in dev])
        started = time.perf_counter()
        settings = TrainSettings(bits=4, batch_size=8, grad_accum=1, max_seq_len=256, lr=1e-3, max_steps=steps,
                                 save_steps=10_000, gradient_checkpointing=False, seed=seed)
        section = train_role(run, "validator", settings, add_references="never")
        train_seconds = time.perf_counter() - started
        tokenizer = load_tokenizer(run.path("adapters/validator"))
        model = load_model(base.path, 4, device_plan(4), adapter=run.path("adapters/validator")).eval()
        p = p_correct_hf(model, tokenizer, [render_validator(r["question"], r["prediction"], style) for r in test], style)
    logprob = answer_logprobs(base.path, test, style)
    right = [r["label"] == CORRECT for r in test]
    threshold = section["threshold"]
    figures = bootstrap_statistics({"p": p, "lp": logprob, "y": right}, {
        "auroc": lambda c: auroc(c["p"], c["y"]),
        "ece": lambda c: ece(c["p"], c["y"]),
        "balanced_accuracy": lambda c: at_threshold(c["p"], c["y"], threshold)["balanced_accuracy"],
        "acceptance_rate": lambda c: at_threshold(c["p"], c["y"], threshold)["acceptance_rate"],
        "logprob_auroc": lambda c: auroc(c["lp"], c["y"]),
        "auroc_minus_logprob": lambda c: auroc(c["p"], c["y"]) - auroc(c["lp"], c["y"]),
    }, n_resamples=1000, seed=0)
    return {"train_rows": len(train), "dev_rows": len(dev), "test_rows": len(test), "right": sum(right),
            "steps": steps, "train_seconds": round(train_seconds, 1), "threshold": threshold,
            "calibration": section["calibration"], **figures}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-run", type=Path, default=None, help="A finished `exar demo` run (default: models/demo).")
    parser.add_argument("--steps", type=int, default=60, help="Validator steps on the dolly predictions.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-dolly", action="store_true")
    args = parser.parse_args(argv)
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; date {date.today()}; "
          f"command: python bench/metacognition.py {' '.join(argv or sys.argv[1:])}")
    demo = args.demo_run or Path("models/demo")
    if (demo / "eval" / "demo" / "report.json").is_file():
        print(f"\n1. the demo ({demo}): validator on the stage-zero answers to the held-out questions")
        for r in demo_figures(demo):
            print(f"  {r['variant']:<14} n {r['n']} ({r['right']} right)  AUROC {_fmt(r['auroc'])}  ECE {_fmt(r['ece'])}  "
                  f"balanced acc. {_fmt(r['balanced_accuracy'])}  accepts {_fmt(r['acceptance_rate'])}  "
                  f"| logprob AUROC {_fmt(r['logprob_auroc'])}  validator - logprob {_fmt(r['auroc_minus_logprob'])}  "
                  "| always accept: AUROC 0.5, balanced acc. 0.5")
    else:
        print(f"\n1. the demo: no {demo}/eval/demo/report.json (run `exar demo` first); skipped")
    if args.skip_dolly:
        return 0
    if not SEED_FILE.is_file():
        print(f"\n2. {SEED_FILE} is absent (it comes with ../shared); skipped")
        return 0
    d = dolly_validator(args.steps, args.seed)
    print(f"\n2. the paper's dolly predictions: SmolLM2-135M validator, {d['steps']} steps ({d['train_seconds']} s) on "
          f"{d['train_rows']} rows, threshold {d['threshold']:.3f} fitted on {d['dev_rows']} dev rows, "
          f"tested on {d['test_rows']} ({d['right']} CORRECT)")
    print(f"  AUROC {_fmt(d['auroc'])}  ECE {_fmt(d['ece'])}  balanced acc. {_fmt(d['balanced_accuracy'])}  "
          f"accepts {_fmt(d['acceptance_rate'])}")
    print(f"  free baseline (SmolLM2 base log-prob of the prediction): AUROC {_fmt(d['logprob_auroc'])}; "
          f"validator - baseline {_fmt(d['auroc_minus_logprob'])}; always accept: AUROC 0.5, balanced acc. 0.5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
