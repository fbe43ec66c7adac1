"""CPU training steps as the demo takes them: trl's LM head over every position vs the labelled ones only.

    python bench/train_cpu.py [--steps 12] [--repeats 3]

The demo's base (SmolLM2-135M-Instruct, imported once as `exar demo` does) in 4-bit NF4 on the CPU
with the demo's settings (exar.demo.train_settings: batch 8, no gradient checkpointing) and the
validator's LoRA targets (every linear layer). Rows are validator rows in DATASET+'s shape made from
exar's demo questions: each question with its own answer (CORRECT) and with the next question's
answer (WRONG). Completion-only loss: a row's label is two or three tokens after a prompt of ~50.
Recipes, alternating within each repeat, each a fresh model and trainer:

  trl   trl's fused LM head as it comes: off Triton devices it projects every position through the
        49k-token vocabulary and masks the prompt's afterwards
  exar  exar's trainer as it runs (exar.train.trainer.score_label_positions_only): the labelled
        positions only, as trl does on a GPU

Step times exclude each run's first step. Prints the median step, the spread, the losses (they must
agree) and exar's speed-up over trl.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

RECIPES = ("trl", "exar")


def validator_rows() -> list[dict]:
    from exar.data import load_qa
    from exar.demo import demo_data

    records = load_qa(demo_data()).records
    rows = []
    for record, other in zip(records, records[1:] + records[:1]):
        rows.append({"question": record.question, "reference": record.answer, "prediction": record.answer,
                     "label": "CORRECT"})
        rows.append({"question": record.question, "reference": record.answer, "prediction": other.answer,
                     "label": "WRONG"})
    return rows


def use_recipe(recipe: str, exar_scoring) -> None:
    """trl's LM head as it comes ("trl") or as exar's trainer sets it ("exar"), for the trainers built from now on."""
    import trl.trainer.utils as trl_utils
    from trl.kernels import chunked_logprob

    import exar.train.trainer as trainer

    trl_utils._use_triton = chunked_logprob._use_triton
    trainer.score_label_positions_only = exar_scoring if recipe == "exar" else (lambda: None)


def time_steps(base: Path, rows: list[dict], steps: int) -> tuple[list[float], list[float]]:
    """(seconds of each step after the first, loss of every step) of one fresh training run."""
    import torch
    from transformers import TrainerCallback

    from exar.demo import train_settings
    from exar.basemodel import prompt_style
    from exar.train.examples import encode, validator_examples
    from exar.train.trainer import build_trainer, device_plan, load_model, load_tokenizer, prepare_model

    settings = train_settings().with_(max_steps=steps, target_modules="all-linear", save_steps=10 * steps)
    style = prompt_style(base)
    tokenizer = load_tokenizer(base)
    encoded = [encode(tokenizer, e, settings.max_seq_len) for e in validator_examples(rows, style)]
    plan = device_plan(settings.bits)
    torch.manual_seed(settings.seed)
    model = prepare_model(load_model(base, settings.bits, plan, for_training=True), settings, plan)
    ends = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as work:
        trainer = build_trainer(model, tokenizer, encoded[:steps * settings.batch_size], [], settings, plan,
                                Path(work), callbacks=[Clock()])
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return [b - a for a, b in zip(ends, ends[1:])], losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each recipe, alternating")
    args = parser.parse_args(argv)

    import torch

    from exar.basemodel import resolve_base
    from exar.demo import BASE
    from exar.train.trainer import score_label_positions_only

    base = resolve_base(BASE).path
    rows = validator_rows()
    times = {r: [] for r in RECIPES}
    losses = {}
    for repeat in range(args.repeats):
        for recipe in RECIPES if repeat % 2 == 0 else RECIPES[::-1]:
            use_recipe(recipe, score_label_positions_only)
            step_seconds, losses[recipe] = time_steps(base, rows, args.steps)
            times[recipe].append(statistics.median(step_seconds))
            print(f"repeat {repeat + 1} {recipe}: median step {times[recipe][-1]:.3f} s "
                  f"[{min(step_seconds):.3f}-{max(step_seconds):.3f}]", flush=True)
    print(f"\nCPU training, {BASE} 4-bit, the demo's settings, validator rows, {args.steps} steps x "
          f"{args.repeats} runs per recipe; {platform.machine()} {torch.get_num_threads()} threads, {date.today()}")
    for recipe in RECIPES:
        print(f"{recipe:<5} median step {statistics.median(times[recipe]):.3f} s over runs "
              f"{[round(t, 3) for t in times[recipe]]}; losses {[round(x, 4) for x in losses[recipe]]}")
    gap = max(abs(a - b) for a, b in zip(losses["trl"], losses["exar"]))
    print(f"exar / trl speed: {statistics.median(times['trl']) / statistics.median(times['exar']):.2f}x; "
          f"largest loss difference {gap:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
