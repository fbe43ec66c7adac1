"""Training rows of the three roles, and their tokenization with the prompt kept out of the loss.

Every prompt and target comes from exar.prompts, the module the edge and eval use too, so the
model is trained on exactly the text it will be shown.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Sequence

from exar.data import QA, question_key
from exar.errors import ExarError
from exar.metrics import answer_key
from exar.prompts import (CORRECT, LABELS, WRONG, PromptStyle, completion_ids, render_completion, render_prompt,
                          role_fields)

IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)


@dataclass(frozen=True)
class Example:
    """One supervised pair; ``question`` groups rows for the validation slice, ``label`` is the validator's."""

    question: str
    prompt: str
    completion: str
    label: str | None = None


def _example(role: str, question: str, target: str, style: PromptStyle, label: str | None = None, **slots) -> Example:
    fields = role_fields(role, question, style=style, **slots)
    return Example(question, render_prompt(fields, style), render_completion(fields, target, style), label)


def answer_examples(records: Iterable[QA], style: PromptStyle) -> list[Example]:
    """stage-zero: question (+ its context passage) -> reference answer."""
    return [_example("answer", r.question, r.answer, style, context=r.context) for r in records]


def validator_examples(rows: Iterable[dict], style: PromptStyle) -> list[Example]:
    """DATASET+ rows: (question, candidate) -> CORRECT / WRONG."""
    return [_example("validator", r["question"], r["label"], style, label=r["label"], candidate=r["prediction"],
                     context=r.get("context") or "") for r in rows]


def reference_examples(rows: Iterable[dict], style: PromptStyle) -> list[Example]:
    """Each question's reference answer as a CORRECT candidate (once per question)."""
    seen, examples = set(), []
    for r in rows:
        key = question_key(r["question"])
        if key not in seen:
            seen.add(key)
            examples.append(_example("validator", r["question"], CORRECT, style, label=CORRECT, candidate=r["reference"],
                                     context=r.get("context") or ""))
    return examples


def exar_examples(rows: Iterable[dict], style: PromptStyle) -> list[Example]:
    """DATASET+ rows -> re-answer rows; the target is ALWAYS the reference answer.

    The loop's round r shows the exar role the first r - 1 rejected answers, so a question whose
    WRONG predictions are A, B, C (coolest temperature first, repeats merged by the loop's own
    ``answer_key``) gives one row per prefix: [A], [A, B], [A, B, C]. A question with a CORRECT
    prediction also gives one row with an empty context (a first attempt). The paper's dolly
    script put the wrong prediction in the target instead.
    """
    by_question: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: float(r.get("temperature") or 0.0)):
        entry = by_question.setdefault(question_key(r["question"]), {"row": r, "rejected": {}, "correct": False})
        if r["label"] == WRONG:
            key = answer_key(r["prediction"])
            if key and key not in entry["rejected"]:
                entry["rejected"][key] = r["prediction"]
        elif r["label"] == CORRECT:
            entry["correct"] = True
        else:
            raise ExarError(f"DATASET+ row for {r['question'][:60]!r}: label {r['label']!r} is not CORRECT or WRONG")
    examples = []
    for entry in by_question.values():
        first, rejected = entry["row"], list(entry["rejected"].values())
        passage = first.get("context") or ""
        if entry["correct"]:
            examples.append(_example("exar", first["question"], first["reference"], style, context=passage))
        for k in range(1, len(rejected) + 1):
            examples.append(_example("exar", first["question"], first["reference"], style, rejected=rejected[:k],
                                     context=passage))
    return examples


def label_counts(examples: Sequence[Example]) -> dict[str, int]:
    return {label: sum(e.label == label for e in examples) for label in LABELS}


def balance(examples: Sequence[Example], seed: int) -> list[Example]:
    """Oversample the smaller validator class to the size of the larger one (seeded), then shuffle.

    The paper's validators, trained on skewed data, learned to always say CORRECT.
    """
    groups = {label: [e for e in examples if e.label == label] for label in LABELS}
    missing = [label for label, group in groups.items() if not group]
    if missing:
        counts = ", ".join(f"{len(g)} {label}" for label, g in groups.items())
        raise ExarError(f"the validator needs rows of both labels, and has {counts}; without CORRECT rows "
                        "use --add-references auto or always (the reference answers as CORRECT rows)")
    rng = random.Random(seed)
    target = max(len(g) for g in groups.values())
    balanced = []
    for group in groups.values():
        balanced += group + rng.choices(group, k=target - len(group))
    rng.shuffle(balanced)
    return balanced


def encode(tokenizer, example: Example, max_seq_len: int) -> dict | None:
    """``input_ids`` of prompt + completion and ``labels`` with every prompt position ignored.

    Where the completion starts is ``exar.prompts.completion_ids``: the rule label scoring and
    eval use too. Returns None when truncation leaves no target token.
    """
    ids, start = completion_ids(lambda text: tokenizer(text).input_ids, example.prompt, example.completion)
    ids = ids[:max_seq_len]
    if start >= len(ids):
        return None
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * start + ids[start:]}
