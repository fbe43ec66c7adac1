"""Batched generation for `exar-train predict` on a GPU, against transformers' own fastest settings.

The model is bench/train_gpu.py's 7B-shape random Llama with a random LoRA adapter (r=16, q/k/v/o),
loaded the two ways predict can: the 16-bit base (``--bits 16``, the default) and NF4 (``--bits 4``).
Random weights write garbage, so every answer is forced to exactly ``--new-tokens`` tokens (sampling
at the paper's T=0.6, top-p 0.9): speed is what counts. Batch 1 is the paper's one-question-at-a-time
generation. Recipes, in this order (the 4-bit ones first, then the bf16 model replaces the NF4 one):

  exar-4bit       predict --bits 4: NF4 base + peft LoRA, ``generate_batch`` (one ``generate`` call
                  per batch; on a GPU since 2026-12-05 the static cache, every batch left-padded to the
                  run's longest prompt as predict does; before that the batch's longest prompt and the
                  dynamic KV cache)
  hf-static-4bit  the same model through transformers' fastest documented setting,
                  ``cache_implementation="static"`` (``generate`` compiles the decoding step: torch.compile,
                  CUDA graphs); prompts padded to one length so the cache keeps one shape
  exar            predict's default: the adapter folded into the bf16 base
                  (exar.train.trainer.load_for_inference), ``generate_batch``
  hf-static       that merged bf16 model with the static cache

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
from train_gpu import SHAPES, random_llama, random_llama_nf4  # noqa: E402

RECIPES = ("exar-4bit", "hf-static-4bit", "exar", "hf-static")


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


def time_recipe(recipe, model, tokenizer, prompts_for, size: int, new_tokens: int, rounds: int) -> dict:
    import torch

    from exar.train.predict import generate_batch, longest_prompt

    prompts = prompts_for(rounds * size)
    batches = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    length = longest_prompt(tokenizer, prompts)

    def run(batch, seed):
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.6, top_p=0.9, seed=seed)
        if recipe.startswith("hf-static"):
            return static_generate(model, tokenizer, batch, length=length, **kwargs)
        return generate_batch(model, tokenizer, batch, pad_to=length, **kwargs)

    started = time.perf_counter()
    run(batches[0], seed=0)  # warm-up: compiles the static cache's decode step, as a run's first batch does
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


def lora_model(shape: dict, bits: int, device: str = "cuda"):
    """The random model with a random LoRA adapter as predict loads stage-zero at ``bits``: NF4 + peft's
    LoRA at 4 bits; at 16 the adapter folded into the bf16 weights, as ``load_for_inference`` does."""
    from peft import LoraConfig, get_peft_model

    model = (random_llama_nf4 if bits == 4 else random_llama)(shape, "sdpa", seed=0, device=device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             init_lora_weights=False, task_type="CAUSAL_LM"))
    return (model.merge_and_unload() if bits == 16 else model).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="a Llama-2 tokenizer folder")
    parser.add_argument("--data", type=Path, required=True, help="QA data whose questions become prompts")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of {', '.join(RECIPES)}")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="timed batches per batch size, after one warm-up")
    parser.add_argument("--shape", choices=SHAPES, default="llama2-7b")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from exar.train.trainer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    tokenizer.padding_side = "left"
    sizes = [int(b) for b in args.batches.split(",")]
    recipes = args.recipes.split(",")
    rows, failures, model, model_bits = [], [], None, None
    for recipe in recipes:
        bits = 4 if recipe.endswith("4bit") else 16
        if bits != model_bits:
            model = None
            torch.cuda.empty_cache()
            model, model_bits = lora_model(SHAPES[args.shape], bits), bits
        for size in sizes:
            try:
                rows.append(time_recipe(recipe, model, tokenizer, lambda n: prompts_from(args.data, n), size,
                                        args.new_tokens, args.rounds))
            except Exception as error:  # a recipe that cannot run is reported, the others still are
                failures.append(f"{recipe} batch {size}: {type(error).__name__}: {str(error)[:300]}")
                print(failures[-1], file=sys.stderr, flush=True)
                continue
            print(json.dumps(rows[-1]), flush=True)
    print(f"\npredict on {torch.cuda.get_device_name()}: {args.shape} shape, LoRA r=16 on NF4 (-4bit) or folded into bf16, {args.new_tokens} new tokens "
          f"per answer, T=0.6 top-p 0.9, {time.strftime('%Y-%m-%d')}")
    print(f"{'recipe':<14} {'batch':>5} {'tokens/s':>9} {'x exar':>7} {'alloc GiB':>9} {'resvd GiB':>9} {'warm-up s':>9}")
    exar = {r["batch"]: r["tokens_per_s"] for r in rows if r["recipe"] == "exar"}  # predict's default
    for r in rows:
        ratio = r["tokens_per_s"] / exar[r["batch"]] if r["batch"] in exar else float("nan")
        print(f"{r['recipe']:<14} {r['batch']:>5} {r['tokens_per_s']:>9.1f} {ratio:>7.2f} {r['peak_allocated_gib']:>9.2f} "
              f"{r['peak_reserved_gib']:>9.2f} {r['warmup_s']:>9.1f}")
    for failure in failures:
        print(f"not measured: {failure}")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                                         "shape": args.shape, "rows": rows, "failures": failures}, indent=2))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
