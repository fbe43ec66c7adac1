"""pre-DATASET+: the stage-zero adapter answers the train pool and the dev questions at several temperatures.

The train pool's answers become the validator's and the exar role's training rows; the dev
questions' answers (``split`` "dev"; no adapter trained on those questions) are where the
validator's threshold is fitted.

Rows are appended to a working file batch by batch, so an interrupted run resumes where it
stopped; the final ``data/pre-dataset-plus.jsonl`` appears (atomically) only when all are done.
Batches are fixed by position and each is seeded from (seed, temperature, first item), so a
resumed run samples the same answers an uninterrupted one would.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from exar import constants as C
from exar.data import QA, append_jsonl, read_jsonl, read_jsonl_resumable, write_jsonl
from exar.errors import ExarError
from exar.prompts import PromptStyle, parse_answer, render_answer
from exar.rundir import Run, atomic_write_json, writes_run

PARTIAL = C.PRE_DATASET_PLUS + ".partial"
PARTIAL_SETTINGS = C.PRE_DATASET_PLUS + ".partial.json"
ANSWER_ADAPTER = f"{C.ADAPTERS_DIR}/answer"


@writes_run("predict")
def predict(run: Run, *, temperatures: Sequence[float] = C.PREDICT_TEMPERATURES, top_p: float = C.PREDICT_TOP_P,
            max_new_tokens: int = C.MAX_NEW_TOKENS, batch_size: int = 8, limit: int | None = None,
            seed: int = C.SEED, bits: int = C.INFERENCE_BITS, force: bool = False) -> dict:
    """Answer the train questions (the first ``limit``) and every dev question at each temperature
    with stage-zero; returns the run.json section.

    ``bits`` is the base's precision while answering: 16 (the default) gives the answers of the model
    that export and the edge deploy (the adapter on the unquantized base); 4 saves GPU memory.
    """
    if run.done(C.PRE_DATASET_PLUS, force=force):
        print(f"predict: {run.path(C.PRE_DATASET_PLUS)} is done (use --force to redo it)", file=sys.stderr)
        return run.settings.get("predict", {})
    if any(t < 0 for t in temperatures) or not temperatures:
        raise ExarError(f"--temperature values must be >= 0, got {list(temperatures)}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ExarError("--batch-size and --max-new-tokens must be at least 1")
    for rel in (C.TRAIN_SPLIT, C.DEV_SPLIT, ANSWER_ADAPTER):
        run.verify(rel)
    train = [QA.from_dict(r) for r in read_jsonl(run.path(C.TRAIN_SPLIT))][:limit]
    dev = [QA.from_dict(r) for r in read_jsonl(run.path(C.DEV_SPLIT))]
    pool = [(q, "train") for q in train] + [(q, "dev") for q in dev]
    settings = {"temperatures": [float(t) for t in temperatures], "top_p": top_p, "max_new_tokens": max_new_tokens,
                "batch_size": batch_size, "limit": limit, "seed": seed, "bits": bits, "pool": len(train), "dev": len(dev)}

    partial, sidecar = run.path(PARTIAL), run.path(PARTIAL_SETTINGS)
    if force or not sidecar.is_file() or json.loads(sidecar.read_text(encoding="utf-8")) != settings:
        partial.unlink(missing_ok=True)
        atomic_write_json(sidecar, settings)
    done = {(r["item"], r["temperature"]) for r in read_jsonl_resumable(partial)}

    style = PromptStyle.from_dict(run.settings["prompt"])
    batches = [(t, start) for t in settings["temperatures"] for start in range(0, len(pool), batch_size)]
    pending = [(t, s) for t, s in batches
               if any((i, t) not in done for i in range(s, min(s + batch_size, len(pool))))]
    if pending:
        _generate(run, pool, pending, done, style, settings)
    rows = sorted(read_jsonl_resumable(partial), key=lambda r: (r["temperature"], r["item"]))
    with run.writing(C.PRE_DATASET_PLUS, "predictions", made_from=[C.TRAIN_SPLIT, C.DEV_SPLIT, ANSWER_ADAPTER]) as tmp:
        write_jsonl(tmp, rows)
    partial.unlink()
    sidecar.unlink()
    section = {**settings, "rows": len(rows)}
    run.update_settings("predict", section)
    return section


def _generate(run: Run, pool: list[tuple[QA, str]], pending: list[tuple[float, int]], done: set, style: PromptStyle,
              settings: dict) -> None:
    from exar.progress import bar

    model, tokenizer = load_role(run, "answer", settings["bits"])
    tokenizer.padding_side = "left"
    size = settings["batch_size"]
    prompts = [render_answer(q.question, q.context, style) for q, _ in pool]
    pad_to = longest_prompt(tokenizer, prompts)
    for temperature, start in bar(pending, desc="predict", unit="batch"):
        items = pool[start:start + size]
        seed = settings["seed"] * 1_000_003 + int(temperature * 1000) * 10_007 + start
        texts = generate_batch(model, tokenizer, prompts[start:start + size],
                               max_new_tokens=settings["max_new_tokens"], temperature=temperature,
                               top_p=settings["top_p"], seed=seed, pad_to=pad_to, rows=min(size, len(pool)))
        for offset, ((record, split), text) in enumerate(zip(items, texts)):
            item = start + offset
            if (item, temperature) in done:
                continue
            append_jsonl(run.path(PARTIAL), {
                "item": item, "question": record.question, "reference": record.answer,
                "aliases": record.aliases, "context": record.context,
                "prediction": parse_answer(text, style), "temperature": temperature, "seed": settings["seed"],
                "split": split,
            })


def load_role(run: Run, role: str, bits: int = C.INFERENCE_BITS):
    """(model in eval mode, tokenizer) of a trained role: its adapter on the run's base at ``bits``."""
    from exar.train.trainer import device_plan, load_for_inference, load_tokenizer

    rel = f"{C.ADAPTERS_DIR}/{role}"
    model = load_for_inference(run.settings["base"]["path"], bits, device_plan(bits), adapter=run.path(rel))
    return model, load_tokenizer(run.path(rel))


def generate_batch(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, temperature: float,
                   top_p: float, seed: int, min_new_tokens: int = 0, pad_to: int | None = None,
                   rows: int | None = None) -> list[str]:
    """The text each prompt continues with, all prompts in one left-padded ``generate`` call.

    One call per batch instead of one per question is what makes predict fast on a GPU
    (bench/predict_gpu.py). There it decodes with transformers' static cache, whose decode step it
    compiles once per shape: a run passes ``pad_to`` (``longest_prompt`` of all its prompts) and
    ``rows`` (its batch size; a shorter last batch is filled up with copies of its last prompt, whose
    answers are dropped) so every batch has one shape and compiles once. The CPU keeps the dynamic
    cache (no compilation to wait for) and pads to the batch's longest prompt. ``temperature`` 0
    decodes greedily; ``tokenizer.padding_side`` must be left. Special tokens are kept in the text, so
    ``parse_answer`` can cut at the end-of-sequence marker.
    """
    import torch

    static = model.device.type == "cuda"
    padding = {"padding": "max_length", "max_length": pad_to} if static and pad_to else {"padding": True}
    filler = [prompts[-1]] * (rows - len(prompts)) if static and rows else []
    encoded = tokenizer(list(prompts) + filler, return_tensors="pt", **padding).to(model.device)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 \
        else {"do_sample": False}
    cache = {"cache_implementation": "static"} if static else {}
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, **sampling, **cache)
    answers = out[:len(prompts), encoded["input_ids"].shape[1]:]
    return tokenizer.batch_decode(answers, skip_special_tokens=False)


def longest_prompt(tokenizer, prompts: Sequence[str]) -> int:
    """The token count of the longest prompt: the one length a GPU run pads every batch to."""
    return max(len(ids) for ids in tokenizer(list(prompts)).input_ids)
