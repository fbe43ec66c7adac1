"""QA pairs written from your documents by a chat model, kept only where the document supports them.

``exar-train generate-qa --docs PATH... -o qa.jsonl`` cuts the documents into passages
(``exar.retrieval``), asks the model (the base chat model, or a run's model) for question/answer
pairs about each passage in batches, parses what it wrote, and keeps a pair only when

- the answer is short (at most ``max_answer_words`` words) and not already inside its question,
- the passage supports it: ROUGE-L recall of the answer against the passage (the share of the
  answer's words found, in order, in the passage) is at least ``min_support``,
- its question is new (``exar.data.question_key``: case, spacing and final punctuation ignored).

Each output row is ``{"question", "answer", "context": <its passage>, "category": "generated",
"passage": <passage id>, "support"}``, which ``exar-train all --data`` reads as it is. The model's
raw outputs are appended to ``<output>.partial.jsonl`` batch by batch, keyed by everything that
decides them, so an interrupted run resumes and a rerun with other filter settings generates
nothing again; the output appears (atomically) only when every passage is done.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from exar import constants as C
from exar.data import append_jsonl, question_key, read_jsonl_resumable, write_jsonl
from exar.errors import ExarError

PAIRS_PER_PASSAGE = C.QA_PAIRS
PASSAGE_WORDS = C.QA_PASSAGE_WORDS
MIN_SUPPORT = C.QA_MIN_SUPPORT
MAX_ANSWER_WORDS = C.QA_MAX_ANSWER_WORDS
MAX_NEW_TOKENS = C.QA_MAX_NEW_TOKENS
BATCH_SIZE = 8
CATEGORY = "generated"

_LEAD = r"^\s*(?:[-*\u2022]\s*|\d+\s*[.)]\s*)?(?:\*\*|__)?\s*"
_QUESTION = re.compile(_LEAD + r"(?:q|question)\s*\d*\s*[:.)]\s*(?:\*\*|__)?\s*(.*)$", re.IGNORECASE)
_ANSWER = re.compile(_LEAD + r"(?:a|answer)\s*\d*\s*[:.)]\s*(?:\*\*|__)?\s*(.*)$", re.IGNORECASE)
_INLINE_ANSWER = re.compile(r"\s(?:\*\*|__)?(?:a|answer)\s*[:]\s*", re.IGNORECASE)


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """(question, answer) pairs in a model's output: ``Q:``/``Question 1.``/``**Q:**``/``1. Q:`` lines,
    each followed by an ``A:``/``Answer:`` line (or ``Q: ... A: ...`` on one line). A question
    without an answer is dropped; an answer is its first line only."""
    pairs, question = [], None
    for line in text.splitlines():
        if match := _QUESTION.match(line):
            body = match.group(1)
            inline = _INLINE_ANSWER.split(body, maxsplit=1)
            question = _clean(inline[0])
            if len(inline) == 2 and question and _clean(inline[1]):
                pairs.append((question, _clean(inline[1])))
                question = None
        elif (match := _ANSWER.match(line)) and question:
            answer = _clean(match.group(1))
            if answer:
                pairs.append((question, answer))
            question = None
    return pairs


def _clean(text: str) -> str:
    text = re.sub(r"(\*\*|__)", "", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return " ".join(text.split())


def support(answer: str, passage: str) -> float:
    """ROUGE-L recall of ``answer`` against ``passage``: the share of its words the passage holds in order."""
    from exar.metrics import rouge_l

    return rouge_l([passage], [answer])[0][1]


@dataclass
class Filtered:
    rows: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=lambda: {"parsed": 0, "too_long": 0, "answer_in_question": 0,
                                                  "unsupported": 0, "duplicate": 0, "kept": 0})


def filter_pairs(generations: Sequence[tuple[object, str]], *, min_support: float = MIN_SUPPORT,
                 max_answer_words: int = MAX_ANSWER_WORDS) -> Filtered:
    """The rows kept from ``(passage, model output)`` pairs, in passage order, and what each filter removed."""
    from exar.metrics import normalize_squad

    out, seen = Filtered(), set()
    for passage, text in generations:
        for question, answer in parse_pairs(text):
            out.counts["parsed"] += 1
            if len(answer.split()) > max_answer_words:
                out.counts["too_long"] += 1
                continue
            if normalize_squad(answer) and normalize_squad(answer) in normalize_squad(question):
                out.counts["answer_in_question"] += 1
                continue
            score = support(answer, passage.text)
            if score < min_support:
                out.counts["unsupported"] += 1
                continue
            key = question_key(question)
            if key in seen:
                out.counts["duplicate"] += 1
                continue
            seen.add(key)
            out.rows.append({"question": question, "answer": answer, "context": passage.text,
                             "category": CATEGORY, "passage": passage.id, "support": round(score, 4)})
    out.counts["kept"] = len(out.rows)
    return out


@dataclass(frozen=True)
class Generator:
    """Which model writes the pairs, and how (recorded with every raw output it made)."""

    model_path: str
    fingerprint: str
    adapter: str | None = None
    layout: str = "chat"
    pairs: int = PAIRS_PER_PASSAGE
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = C.PREDICT_TOP_P
    seed: int = C.SEED

    def key(self, prompt: str) -> str:
        """What decides one raw output: the weights, the prompt text and the decoding settings."""
        parts = [self.fingerprint, self.adapter, prompt, self.max_new_tokens, self.temperature, self.top_p, self.seed]
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:32]


def resolve_generator(model: str | Path, *, layout: str = "auto", **settings) -> Generator:
    """``model``: a BASE (HF folder, .gguf, built-in name), or a run folder: its base, and its
    pre-trained adapter when one was trained and not merged."""
    from exar.basemodel import resolve_base
    from exar.rundir import Run

    adapter, fingerprint = None, None
    if (Path(model) / C.RUN_SETTINGS).is_file():
        from exar.train.pretrain import ADAPTER, MERGE_SECTION

        run = Run.open(model)
        if "base" not in run.settings:
            raise ExarError(f"{run.root}: no base model recorded in this run")
        base = run.settings["base"]
        path, fingerprint = base["path"], base["fingerprint"]
        if run.has(ADAPTER) and MERGE_SECTION not in run.settings:
            adapter = str(run.path(ADAPTER))
            fingerprint += ":" + run.verify(ADAPTER)["sha256"]
    else:
        base = resolve_base(model)
        path, fingerprint = base.path, base.fingerprint
    from exar.basemodel import prompt_style

    if layout == "auto":
        layout = "chat" if prompt_style(path, "plain").chat_template else "plain"
    return Generator(path, fingerprint, adapter, layout, **settings)


def generate_qa(docs: Sequence[Path | str], out: Path | str, generator: Generator, *, words: int = PASSAGE_WORDS,
                overlap: int = 0, batch_size: int = BATCH_SIZE, min_support: float = MIN_SUPPORT,
                max_answer_words: int = MAX_ANSWER_WORDS, progress: bool = True) -> dict:
    """Write ``out`` (JSONL QA rows) from ``docs``; returns the summary (counts per filter)."""
    from exar.basemodel import prompt_style
    from exar.prompts import parse_answer, render_qa_generation
    from exar.retrieval import chunk_documents, load_documents

    if batch_size < 1 or generator.pairs < 1 or generator.max_new_tokens < 1:
        raise ExarError("--batch-size, --pairs and --max-new-tokens must be at least 1")
    if not 0.0 <= min_support <= 1.0:
        raise ExarError(f"--min-support must be in [0, 1], got {min_support}")
    out = Path(out)
    passages = chunk_documents(load_documents(docs), words, overlap)
    style = prompt_style(generator.model_path, generator.layout)
    prompts = [render_qa_generation(p.text, generator.pairs, style) for p in passages]
    keys = [generator.key(p) for p in prompts]

    partial = out.with_name(out.name + ".partial.jsonl")
    done = {row["key"]: row["raw"] for row in read_jsonl_resumable(partial) if "key" in row}
    todo = [i for i, k in enumerate(keys) if k not in done]
    if todo and len(todo) < len(keys):
        print(f"generate-qa: resuming, {len(keys) - len(todo)} of {len(keys)} passages already done in {partial}",
              file=sys.stderr)
    if todo:
        _generate(generator, prompts, keys, passages, todo, partial, batch_size, progress)
        done = {row["key"]: row["raw"] for row in read_jsonl_resumable(partial) if "key" in row}
    generations = [(p, parse_answer(done[k], style)) for p, k in zip(passages, keys)]
    filtered = filter_pairs(generations, min_support=min_support, max_answer_words=max_answer_words)
    summary = {"output": str(out), "passages": len(passages), "documents": sorted({p.doc for p in passages}),
               "counts": filtered.counts, "model": generator.model_path, "adapter": generator.adapter,
               "layout": generator.layout, "pairs_per_passage": generator.pairs, "min_support": min_support,
               "max_answer_words": max_answer_words, "support": "ROUGE-L recall of the answer against its passage"}
    if not filtered.rows:
        counts = ", ".join(f"{k} {v}" for k, v in filtered.counts.items())
        raise ExarError(f"no QA pair passed the filters ({counts}); the raw outputs stay in {partial} "
                        "(a rerun with a lower --min-support reuses them)")
    write_jsonl(out, filtered.rows)
    partial.unlink(missing_ok=True)
    return summary


def _generate(generator: Generator, prompts: list[str], keys: list[str], passages: list, todo: list[int],
              partial: Path, batch_size: int, progress: bool) -> None:
    """The model's raw output for each pending passage, appended one batch at a time."""
    from exar.progress import bar
    from exar.train.predict import generate_batch, longest_prompt
    from exar.train.trainer import device_plan, head_dim, load_for_inference, load_tokenizer

    plan = device_plan(16, head_dim(generator.model_path))
    tokenizer = load_tokenizer(generator.model_path)
    tokenizer.padding_side = "left"
    model = load_for_inference(generator.model_path, 16, plan, adapter=generator.adapter)
    partial.parent.mkdir(parents=True, exist_ok=True)
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    pad_to = longest_prompt(tokenizer, [prompts[i] for i in todo])
    steps = bar(batches, desc="generate-qa", unit="batch") if progress else batches
    for batch in steps:
        texts = generate_batch(model, tokenizer, [prompts[i] for i in batch], max_new_tokens=generator.max_new_tokens,
                               temperature=generator.temperature, top_p=generator.top_p,
                               seed=generator.seed * 1_000_003 + batch[0], pad_to=pad_to,
                               rows=min(batch_size, len(todo)))
        for i, text in zip(batch, texts):
            append_jsonl(partial, {"key": keys[i], "passage": passages[i].id, "raw": text})
