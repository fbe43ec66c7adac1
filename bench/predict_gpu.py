"""Batched generation for `exar-train predict` on a GPU: tokens/s at batch 1, 16, 64 in one run.

The model is the 7B-shape NF4 base of bench/train_gpu.py (random weights) with a random LoRA
adapter on q/k/v/o, as predict loads stage-zero; every batch goes through predict's own
``generate_batch`` (left padding, one ``generate`` call, sampling at the paper's T=0.6, top-p 0.9).
Random weights write garbage, so every answer is forced to exactly ``--new-tokens`` tokens:
speed is what counts. Batch 1 is the paper's one-question-at-a-time generation.

    python bench/predict_gpu.py --tokenizer ../shared/models/llama2-tokenizer \
        --data ../shared/data/dolly/databricks-dolly-15k.head49.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_gpu import SHAPES, random_llama_nf4  # noqa: E402


def prompts_from(data: Path, count: int) -> list[str]:
    """``count`` answer prompts rendered by exar.prompts from the data's questions (cycled)."""
    from exar.data import load_qa
    from exar.prompts import render_answer

    records = load_qa(data).records
    return [render_answer(r.question, r.context) for r in (records * (count // len(records) + 1))[:count]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="a Llama-2 tokenizer folder")
    parser.add_argument("--data", type=Path, required=True, help="QA data whose questions become prompts")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--shape", choices=SHAPES, default="llama2-7b")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model

    from exar.train.predict import generate_batch
    from exar.train.trainer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    tokenizer.padding_side = "left"
    model = random_llama_nf4(SHAPES[args.shape], "sdpa", seed=0, device="cuda")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             init_lora_weights=False, task_type="CAUSAL_LM"))
    model.eval()
    sizes = [int(b) for b in args.batches.split(",")]
    rows = []
    for size in sizes:
        prompts = prompts_from(args.data, max(2 * size, 4))
        batches = [prompts[i:i + size] for i in range(0, len(prompts), size)]

        def run(batch, seed, new_tokens=args.new_tokens):
            return generate_batch(model, tokenizer, batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  temperature=0.6, top_p=0.9, seed=seed)

        run(batches[0], seed=0, new_tokens=4)  # warm-up: kernels, allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for i, batch in enumerate(batches):
            run(batch, seed=i)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        tokens = len(prompts) * args.new_tokens
        rows.append({"batch": size, "prompts": len(prompts), "new_tokens": tokens, "seconds": seconds,
                     "tokens_per_s": tokens / seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
        print(json.dumps(rows[-1]), flush=True)
    one = next((r["tokens_per_s"] for r in rows if r["batch"] == 1), None)
    print(f"\npredict on {torch.cuda.get_device_name()}: {args.shape} shape, NF4 + LoRA, {args.new_tokens} new tokens "
          f"per answer, T=0.6 top-p 0.9")
    print(f"{'batch':>5} {'tokens/s':>9} {'x batch 1':>9} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['batch']:>5} {r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / one if one else float('nan'):>9.1f} "
              f"{r['peak_gib']:>9.2f}")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                                         "shape": args.shape, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
