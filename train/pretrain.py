"""Domain pre-training: a LoRA trained with the causal-LM loss on your raw documents.

``exar-train pretrain --base BASE --text PATH...`` reads .txt/.md/.pdf (``exar.retrieval``),
cuts each document's tokens into blocks, holds a seeded share of the blocks out, and trains the
adapter ``adapters/pretrain/`` on windows (with overlap) over the remaining text, through the same
trainer as the three roles (``exar.train.trainer.fit_adapter``: QLoRA, checkpoints, resume,
packing). Perplexity on the held-out blocks is measured with the adapter off (the base) and on,
and recorded in run.json ``pretrain``.

Held-out text never reaches training: the blocks are cut without overlap first, and the training
windows overlap only inside runs of consecutive training blocks.

``exar-train all --merge-pretrained`` then merges that adapter into the base
(``pretrained-base/`` in the run, recorded in run.json ``pretrain-merge``) and makes it the run's
base, so the three roles train on, and export converts, the pre-trained model.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from exar import constants as C
from exar.errors import ExarError
from exar.rundir import Run

ROLE = "pretrain"
SECTION = "pretrain"
MERGE_SECTION = "pretrain-merge"
ADAPTER = f"{C.ADAPTERS_DIR}/{ROLE}"
MERGED_BASE = "pretrained-base"
CHUNK_TOKENS = C.PRETRAIN_CHUNK_TOKENS
CHUNK_OVERLAP = C.PRETRAIN_OVERLAP
HELD_OUT = C.PRETRAIN_HELD_OUT
MIN_BLOCK_TOKENS = 16      # a document's last block shorter than this joins the block before it
_WEIGHT_FILES = (".safetensors", ".bin", ".pth")
_NOT_COPIED = ("config.json", "generation_config.json", "model.safetensors.index.json", "exar-import.json")


@dataclass(frozen=True)
class Chunk:
    """A piece of one document's text, at most ``chunk_tokens`` tokens of it."""

    id: str
    text: str
    tokens: int


def token_chunks(tokenizer, documents: Sequence, *, chunk_tokens: int = CHUNK_TOKENS, overlap: int = CHUNK_OVERLAP,
                 held_out: float = HELD_OUT, seed: int = C.SEED) -> tuple[list[Chunk], list[Chunk]]:
    """(training chunks, held-out chunks) of ``documents`` (``exar.retrieval.Document``).

    Each document's tokens are cut into blocks of ``chunk_tokens``; ``held_out`` of all blocks
    (at least one when there are two or more) are chosen by a seeded hash and kept whole for
    perplexity. Training chunks are windows of ``chunk_tokens`` with ``overlap`` over each run of
    consecutive training blocks. Chunk texts are slices of the document (token offsets).
    """
    if chunk_tokens < 8 or not 0 <= overlap < chunk_tokens:
        raise ExarError(f"--chunk-tokens must be >= 8 and --overlap in [0, chunk tokens), got {chunk_tokens} and {overlap}")
    if not 0.0 <= held_out < 1.0:
        raise ExarError(f"--held-out must be in [0, 1), got {held_out}")
    blocks = []  # (doc, text, offsets, first token, end token)
    for doc in documents:
        offsets = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        starts = list(range(0, len(offsets), chunk_tokens))
        if len(starts) > 1 and len(offsets) - starts[-1] < MIN_BLOCK_TOKENS:
            starts.pop()
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(offsets)
            blocks.append((doc, offsets, start, end))
    if not blocks:
        raise ExarError("the documents hold no tokens to train on")
    ranked = sorted(range(len(blocks)), key=lambda i: hashlib.sha256(f"{seed}\0{blocks[i][0].name}\0{blocks[i][2]}".encode()).hexdigest())
    n_held = round(held_out * len(blocks))
    if held_out > 0 and n_held == 0 and len(blocks) > 1:
        n_held = 1
    held = set(ranked[:n_held])

    def chunk(doc, offsets, start: int, end: int) -> Chunk:
        return Chunk(f"{doc.name}@{start}", doc.text[offsets[start][0]:offsets[end - 1][1]], end - start)

    held_chunks = [chunk(*blocks[i]) for i in sorted(held)]
    train_chunks, step = [], chunk_tokens - overlap
    i = 0
    while i < len(blocks):
        if i in held:
            i += 1
            continue
        doc, offsets, start, end = blocks[i]
        while i + 1 < len(blocks) and i + 1 not in held and blocks[i + 1][0] is doc:
            i += 1
            end = blocks[i][3]
        for first in range(start, max(end - overlap, start + 1), step):
            train_chunks.append(chunk(doc, offsets, first, min(first + chunk_tokens, end)))
        i += 1
    if not train_chunks:
        raise ExarError(f"every chunk of the documents was held out; lower --held-out ({held_out}) or add text")
    return train_chunks, held_chunks


def chunk_examples(chunks: Sequence[Chunk]):
    """Trainer rows for raw text: no prompt, the whole chunk is the target (causal-LM loss on every token)."""
    from exar.train.examples import Example

    return [Example(question=c.id, prompt="", completion=c.text) for c in chunks]


def perplexity(model, rows: Sequence[dict]) -> tuple[float, int]:
    """(exp of the mean next-token NLL over every label position of ``rows``, how many tokens were scored)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]], device=model.device)
            labels = torch.tensor(row["labels"][1:], device=model.device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            mask = labels != -100
            nll = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
            total, count = total + float(nll), count + int(mask.sum())
    if count == 0:
        raise ExarError("no held-out tokens to measure perplexity on")
    return math.exp(total / count), count


def pretrain(base: str | Path, texts: Sequence[Path | str], settings=None, *, run_dir: str | Path | None = None,
             chunk_tokens: int = CHUNK_TOKENS, overlap: int = CHUNK_OVERLAP, held_out: float = HELD_OUT,
             resume: bool = True, force: bool = False) -> Run:
    """Train ``adapters/pretrain/`` on ``texts``; run.json ``pretrain`` holds the perplexities before and after.

    Every input is checked (documents read, chunks cut) before the run is touched.
    """
    from exar.basemodel import resolve_base
    from exar.retrieval import load_documents
    from exar.train.settings import TrainSettings
    from exar.train.trainer import load_tokenizer

    settings = settings or TrainSettings()
    if chunk_tokens > settings.max_seq_len:
        raise ExarError(f"--chunk-tokens {chunk_tokens} is longer than --max-seq-len {settings.max_seq_len}")
    documents = load_documents(texts)
    base_model = resolve_base(base)
    tokenizer = load_tokenizer(base_model.path)
    train_chunks, held_chunks = token_chunks(tokenizer, documents, chunk_tokens=chunk_tokens, overlap=overlap,
                                             held_out=held_out, seed=settings.seed)
    section_inputs = {
        "documents": [{"path": d.path, "name": d.name, "sha256": d.sha256} for d in documents],
        "chunking": {"chunk_tokens": chunk_tokens, "overlap": overlap, "held_out": held_out, "seed": settings.seed},
    }
    run = Run.open_or_create(run_dir)
    with run.lock(SECTION):
        _pretrain_into(run, base_model, train_chunks, held_chunks, section_inputs, settings, resume, force)
    return run


def _pretrain_into(run: Run, base_model, train_chunks: list[Chunk], held_chunks: list[Chunk], section_inputs: dict,
                   settings, resume: bool, force: bool) -> None:
    from exar.train.examples import encode
    from exar.train.trainer import fit_adapter

    run.bind_base(base_model.to_dict())
    recorded = run.settings.get(SECTION) or {}
    if run.has(ADAPTER) and not force:
        if {k: recorded.get(k) for k in section_inputs} != section_inputs:
            raise ExarError(f"{run.root}: this run already holds a pre-trained adapter made from other documents "
                            "or chunking; pass --force to replace it, or use a new --run")
        print(f"pretrain: {run.path(ADAPTER)} is done (use --force to retrain)", file=sys.stderr)
        return

    fitted = fit_adapter(run, ROLE, chunk_examples(train_chunks), chunk_examples(held_chunks), settings,
                         resume=resume and not force)
    held_rows = [r for r in (encode(fitted.tokenizer, e, settings.max_seq_len)
                             for e in chunk_examples(held_chunks)) if r is not None]
    measured = {}
    if held_rows:
        with fitted.model.disable_adapter():
            measured["ppl_before"], tokens = perplexity(fitted.model, held_rows)
        measured["ppl_after"], _ = perplexity(fitted.model, held_rows)
        measured["held_out_tokens"] = tokens
    section = {
        **section_inputs, **fitted.summary,
        "base": base_model.to_dict(),
        "chunks": {"train": len(train_chunks), "held_out": len(held_chunks),
                   "train_tokens": sum(c.tokens for c in train_chunks),
                   "held_out_ids": [c.id for c in held_chunks]},
        "perplexity": "exp(mean next-token NLL) over the held-out chunks; before = the base (adapter off), "
                      f"after = base + adapter, both at --bits {settings.bits}",
        **measured,
    }
    run.update_settings(SECTION, section)


# --- merging the pre-trained adapter into the base (exar-train all --merge-pretrained) -----------

def merge_pretrained(base: str | Path, run_dir: str | Path | None) -> str:
    """Merge the run's pre-trained adapter into ``base`` once, make the merged model the run's base,
    and return its folder (the BASE the following stages resolve).

    Refused when the run holds no pre-trained adapter, was pre-trained on another base, or already
    holds data or adapters trained on the unmerged base.
    """
    from exar.basemodel import resolve_base

    if run_dir is None or not (Path(run_dir) / C.RUN_SETTINGS).is_file():
        raise ExarError("--merge-pretrained needs --run naming the run where `exar-train pretrain` trained its adapter")
    run = Run.open(run_dir)
    if not run.has(ADAPTER):
        raise ExarError(f"{run.root}: no pre-trained adapter ({ADAPTER}); run `exar-train pretrain --run {run.root}` first")
    adapter = run.verify(ADAPTER)
    given = resolve_base(base)
    merged = run.settings.get(MERGE_SECTION)
    if merged is not None:
        if merged["from_base"]["fingerprint"] != given.fingerprint or merged["adapter_sha256"] != adapter["sha256"]:
            raise ExarError(f"{run.root}: the run's base was merged from another base or adapter; use a new --run")
        run.verify(MERGED_BASE)
        return str(run.path(MERGED_BASE))
    if (run.settings.get(SECTION) or {}).get("base", {}).get("fingerprint") != given.fingerprint:
        raise ExarError(f"{run.root}: the adapter was pre-trained on another base than {base!r}")
    trained = [p for p in (C.TRAIN_SPLIT, *(f"{C.ADAPTERS_DIR}/{r}" for r in C.ROLES)) if run.entry(p)]
    if trained:
        raise ExarError(f"{run.root}: already holds {', '.join(trained)} made on the unmerged base; "
                        "merge before stage-zero, in a run of its own")

    from exar.progress import status

    with run.lock(MERGE_SECTION), status(f"merging {ADAPTER} into {given.name} -> {run.path(MERGED_BASE)}"):
        with run.writing(MERGED_BASE, "pretrained-base", made_from=[ADAPTER], is_dir=True) as tmp:
            _merge_into(Path(given.path), run.path(ADAPTER), tmp)
        folder = resolve_base(run.path(MERGED_BASE))
        run.update_settings(MERGE_SECTION, {"adapter": ADAPTER, "adapter_sha256": adapter["sha256"],
                                            "from_base": given.to_dict(), "into": MERGED_BASE})
        run.update_settings("base", folder.to_dict())
    print(f"pretrain: the run's base is now {folder.path} (the pre-trained adapter merged into {given.name})",
          file=sys.stderr)
    return folder.path


def _merge_into(base_dir: Path, adapter_dir: Path, dest: Path) -> None:
    """base + LoRA merged in fp32 and saved with the base's dtype; tokenizer files copied unchanged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from exar.basemodel import read_config

    config = read_config(base_dir)
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.to(dtype).save_pretrained(str(dest))
    for file in base_dir.iterdir():
        if file.is_file() and file.suffix not in _WEIGHT_FILES and file.name not in _NOT_COPIED:
            shutil.copyfile(file, dest / file.name)
