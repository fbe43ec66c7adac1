"""Generations and teacher-forced scores per variant, cached so a rerun or an added variant redoes nothing.

``eval/<name>/generations/<variant>.jsonl`` holds one edge-loop ``Result.to_dict()`` per question
(the whole loop, or only its first round when just the answers are compared), and
``eval/<name>/teacher/<variant>.jsonl`` the teacher-forced scores of the reference answers. Rows
are appended as they are made and found again by a key over everything that decides them
(question, context, the weights' manifest hashes, prompt style, loop settings, and for KL the
reference variant's rows), so a changed model or setting is recomputed, never reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from exar.data import QA, append_jsonl, read_jsonl_resumable
from exar.edge.loop import LoopSettings, run_loop
from exar.eval import teacher
from exar.eval.variants import Variant, open_variant
from exar.metrics import log_softmax
from exar.prompts import PromptStyle, completion_ids, render_completion, render_prompt, role_fields

GENERATIONS = "generations"
TEACHER = "teacher"


@dataclass(frozen=True)
class Plan:
    """What to compute for every variant: the questions, the loop's settings, how far to run it."""

    questions: Sequence[QA]
    style: PromptStyle
    loop: LoopSettings
    full_loop: bool             # False: only the first round (stage-zero answer + its verdict)
    kl_top_k: int = teacher.KL_TOP_K
    threads: int | None = None

    @property
    def loop_settings(self) -> LoopSettings:
        return self.loop if self.full_loop else replace(self.loop, max_rounds=1)


@dataclass
class VariantRows:
    generations: list[dict]     # Result.to_dict() per question
    teacher: list[dict]         # {"nll": [...], "kl": [...] | None, ...} per question
    computed: int               # rows made now (the rest came from the cache)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


def _cached(path: Path) -> dict[str, dict]:
    return {row["key"]: row for row in read_jsonl_resumable(path) if "key" in row}


def collect(run, variant: Variant, weights: str, plan: Plan, folder: Path,
            reference: list[dict] | None, progress: bool = True) -> VariantRows:
    """Every question's loop result and teacher-forced scores for one variant; loads it at most once.

    ``weights`` identifies the variant's files (``variants.fingerprint``); ``reference`` is the
    reference variant's teacher rows (None when this variant is the reference).
    """
    from exar.progress import bar

    gen_path, teacher_path = folder / GENERATIONS / f"{variant.slug}.jsonl", folder / TEACHER / f"{variant.slug}.jsonl"
    gen_path.parent.mkdir(parents=True, exist_ok=True)
    teacher_path.parent.mkdir(parents=True, exist_ok=True)
    style_dict = plan.style.to_dict()
    full_settings = asdict(plan.loop)
    one_round = asdict(replace(plan.loop, max_rounds=1))

    def gen_keys(qa: QA) -> list[str]:
        """A full-loop row also answers a first-round-only request: its first round is the same computation."""
        full = _key(qa.question, qa.context, weights, style_dict, full_settings)
        return [full] if plan.full_loop else [_key(qa.question, qa.context, weights, style_dict, one_round), full]

    def teacher_key(index: int, qa: QA) -> str:
        ref = reference[index]["key"] if reference is not None else None
        return _key(qa.question, qa.context, qa.answer, weights, style_dict, plan.kl_top_k, ref)

    gen_cache, teacher_cache = _cached(gen_path), _cached(teacher_path)
    generations = [next((gen_cache[k] for k in gen_keys(qa) if k in gen_cache), None) for qa in plan.questions]
    teacher_rows = [teacher_cache.get(teacher_key(i, qa)) for i, qa in enumerate(plan.questions)]
    todo = [i for i in range(len(plan.questions)) if generations[i] is None or teacher_rows[i] is None]
    if not todo:
        return VariantRows(generations, teacher_rows, 0)

    backend = open_variant(run, variant, threads=plan.threads)
    try:
        for i in bar(todo, desc=f"{variant.name}", unit="question") if progress else todo:
            qa = plan.questions[i]
            if generations[i] is None:
                result = run_loop(backend, qa.question, context=qa.context, settings=plan.loop_settings).to_dict()
                generations[i] = {"key": gen_keys(qa)[0], **result}
                append_jsonl(gen_path, generations[i])
            if teacher_rows[i] is None:
                ref_row = reference[i] if reference is not None else None
                teacher_rows[i] = {"key": teacher_key(i, qa), **_teacher_scores(backend, qa, plan, ref_row)}
                append_jsonl(teacher_path, teacher_rows[i])
    finally:
        backend.close()
    return VariantRows(generations, teacher_rows, len(todo))


def _teacher_scores(backend, qa: QA, plan: Plan, ref_row: dict | None) -> dict:
    """NLL of the reference answer's tokens; for the reference variant its top-k support, else KL against it."""
    fields = role_fields("answer", qa.question, context=qa.context, style=plan.style)
    prompt = render_prompt(fields, plan.style)
    if ref_row is None:
        ids, n_prompt = completion_ids(backend.tokenize, prompt, render_completion(fields, qa.answer, plan.style))
    else:
        ids, n_prompt = ref_row["ids"], ref_row["n_prompt"]
    logprobs = log_softmax(backend.teacher_forced_logits("answer", ids[:n_prompt], ids[n_prompt:]))
    row = {"nll": teacher.token_nll(logprobs, ids, n_prompt)}
    if ref_row is None:
        top_ids, top_logprobs = teacher.top_support(logprobs, plan.kl_top_k)
        row.update(ids=ids, n_prompt=n_prompt, top_ids=top_ids, top_logprobs=top_logprobs)
    else:
        row["kl"] = teacher.kl_divergence(ref_row["top_ids"], ref_row["top_logprobs"], logprobs)
    return row
