"""Batched generation for `exar-train predict` on a GPU, against transformers' own fastest settings.

The model is the 7B-shape NF4 base of bench/train_gpu.py (random weights) with a random LoRA
adapter on q/k/v/o, as predict loads stage-zero. Random weights write garbage, so every answer is
forced to exactly ``--new-tokens`` tokens (sampling at the paper's T=0.6, top-p 0.9): speed is what
counts. Batch 1 is the paper's one-question-at-a-time generation. Recipes, in this order:

  exar          predict's own ``generate_batch``: left padding to the batch's longest prompt, one
                ``generate`` call, the dynamic KV cache, SDPA
  hf-static     transformers' fastest documented setting: ``cache_implementation="static"``, which
                makes ``generate`` compile the decoding step (torch.compile, CUDA graphs); prompts
                padded to one length so the cache keeps one shape (else every batch recompiles)
  exar-merged   exar.train.kernels.merge_for_generation: the NF4 weights decoded once and the LoRA
                update folded in, bf16 (13 GB at 7B shape), then ``generate_batch``

    python bench/predict_gpu.py --tokenizer ../shared/models/llama2-tokenizer \
        --data ../shared/data/dolly/databricks-dolly-15k.head49.jsonl --batches 1,64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_gpu import SHAPES, random_llama_nf4  # noqa: E402

RECIPES = ("exar", "hf-static", "exar-merged")


def prompts_from(data: Path, count: int) -> list[str]:
    """``count`` answer prompts rendered by exar.prompts from the data's questions (cycled)."""
    from exar.data import load_qa
    from exar.prompts import render_answer

    records = load_qa(data).records
    return [render_answer(r.question, r.context) for r in (records * (count // len(records) + 1))[:count]]


def static_generate(model, tokenizer, prompts, *, max_new_tokens, min_new_tokens, temperature, top_p, seed, length):
    """transformers' static-cache generation (auto-compiled decode step), prompts left-padded to ``length``."""
    import torch

    encoded = tokenizer(list(prompts), return_tensors="pt", padding="max_length", max_length=length).to(model.device)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=temperature,
                             top_p=top_p, cache_implementation="static")
    return tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=False)


def time_recipe(recipe, model, tokenizer, prompts_for, size: int, new_tokens: int) -> dict:
    import torch

    from exar.train.predict import generate_batch

    prompts = prompts_for(2 * size)
    batches = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    length = max(len(tokenizer(p).input_ids) for p in prompts)

    def run(batch, seed, tokens=new_tokens):
        kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.6, top_p=0.9, seed=seed)
        if recipe == "hf-static":
            return static_generate(model, tokenizer, batch, length=length, **kwargs)
        return generate_batch(model, tokenizer, batch, **kwargs)

    started = time.perf_counter()
    run(batches[0], seed=0, tokens=new_tokens if recipe == "hf-static" else 4)  # warm-up (compilation for static)
    torch.cuda.synchronize()
    warmup = time.perf_counter() - started
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for i, batch in enumerate(batches):
        started = time.perf_counter()
        texts = run(batch, seed=i)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        assert len(texts) == len(batch)
    tokens = len(prompts) * new_tokens
    return {"recipe": recipe, "batch": size, "prompts": len(prompts), "new_tokens": tokens,
            "seconds": sum(seconds), "batch_seconds": seconds, "tokens_per_s": tokens / sum(seconds),
            "warmup_s": warmup, "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="a Llama-2 tokenizer folder")
    parser.add_argument("--data", type=Path, required=True, help="QA data whose questions become prompts")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of {', '.join(RECIPES)}")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--shape", choices=SHAPES, default="llama2-7b")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model

    from exar.train.kernels import merge_for_generation
    from exar.train.trainer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    tokenizer.padding_side = "left"
    model = random_llama_nf4(SHAPES[args.shape], "sdpa", seed=0, device="cuda")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             init_lora_weights=False, task_type="CAUSAL_LM"))
    model.eval()
    sizes = [int(b) for b in args.batches.split(",")]
    recipes = args.recipes.split(",")
    rows, failures = [], []
    for recipe in recipes:
        if recipe == "exar-merged":
            model = merge_for_generation(model)
        for size in sizes:
            try:
                rows.append(time_recipe(recipe, model, tokenizer, lambda n: prompts_from(args.data, n), size,
                                        args.new_tokens))
            except Exception as error:  # a recipe that cannot run is reported, the others still are
                failures.append(f"{recipe} batch {size}: {type(error).__name__}: {str(error)[:300]}")
                print(failures[-1], file=sys.stderr, flush=True)
                continue
            print(json.dumps(rows[-1]), flush=True)
    print(f"\npredict on {torch.cuda.get_device_name()}: {args.shape} shape, NF4 + LoRA r=16, {args.new_tokens} new tokens "
          f"per answer, T=0.6 top-p 0.9, {time.strftime('%Y-%m-%d')}")
    print(f"{'recipe':<12} {'batch':>5} {'tokens/s':>9} {'x exar':>7} {'alloc GiB':>9} {'resvd GiB':>9} {'warm-up s':>9}")
    exar = {r["batch"]: r["tokens_per_s"] for r in rows if r["recipe"] == "exar"}
    for r in rows:
        ratio = r["tokens_per_s"] / exar[r["batch"]] if r["batch"] in exar else float("nan")
        print(f"{r['recipe']:<12} {r['batch']:>5} {r['tokens_per_s']:>9.1f} {ratio:>7.2f} {r['peak_allocated_gib']:>9.2f} "
              f"{r['peak_reserved_gib']:>9.2f} {r['warmup_s']:>9.1f}")
    for failure in failures:
        print(f"not measured: {failure}")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                                         "shape": args.shape, "rows": rows, "failures": failures}, indent=2))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
