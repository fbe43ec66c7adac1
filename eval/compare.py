"""What did quantization cost? Every variant on the run's held-out questions, scored alike, with intervals.

The same questions, references, BERTScore backbone and loop settings for every variant; the first
variant is the reference, and each metric's difference against it gets a seeded paired-bootstrap
95% interval and one plain sentence. ``compare`` is what ``exar-eval compare`` and ``exar demo`` call.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from math import exp
from pathlib import Path
from typing import Sequence

from exar.constants import EVAL_DIR, TEST_SPLIT
from exar.data import QA, load_qa
from exar.errors import ExarError
from exar.eval.bootstrap import describe_difference, paired_bootstrap
from exar.eval.generations import Plan, collect
from exar.eval.variants import Variant, artifacts, fingerprint, model_bytes, parse_variants
from exar.rundir import Run

WHATS = ("answer", "pipeline", "both")
DEFAULT_NAME = "compare"

# (key, label, higher is better): the per-question metrics, in report order.
ANSWER_METRICS = (
    ("em_lower", "exact match (case-insensitive)", True),
    ("em_squad", "exact match (SQuAD-normalized)", True),
    ("token_f1", "token F1", True),
    ("rouge1_f", "ROUGE-1 F", True),
    ("rouge2_f", "ROUGE-2 F", True),
    ("rougeL_f", "ROUGE-L F", True),
    ("bleu", "BLEU (sentence)", True),
    ("bertscore_p", "BERTScore P", True),
    ("bertscore_r", "BERTScore R", True),
    ("bertscore_f", "BERTScore F1", True),
)
MODEL_METRICS = (
    ("agree", "identical answers to the reference variant", True),
    ("validator_correct", "validator accuracy (held-out)", True),
    ("nll", "NLL per token of the reference answers", False),
    ("kl", "KL divergence from the reference variant", False),
    ("answer_ms", "answer latency ms", False),
)
PIPELINE_METRICS = tuple((f"loop_{k}", f"loop {label}", up) for k, label, up in ANSWER_METRICS) + (
    ("loop_agree", "loop: identical final answers to the reference variant", True),
    ("accepted_first", "accepted at first try", True),
    ("abstain", "abstentions", False),
    ("rounds", "rounds per question", False),
    ("loop_ms", "loop latency ms", False),
)
HEADLINE = {"answer": "bertscore_f", "pipeline": "loop_bertscore_f", "both": "bertscore_f"}


@dataclass(frozen=True)
class CompareSettings:
    """How answers are scored and differences judged (loop settings come from the run, see LoopSettings)."""

    what: str = "both"
    bertscore_model: str | None = None
    bertscore_layers: int | None = None
    idf: bool = False
    rescale: bool = False
    limit: int | None = None
    resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95
    threads: int | None = None

    def __post_init__(self):
        if self.what not in WHATS:
            raise ExarError(f"--what must be one of {', '.join(WHATS)}, got {self.what!r}")
        if self.limit is not None and self.limit < 1:
            raise ExarError(f"--limit must be >= 1, got {self.limit}")


def eval_folder(name: str) -> str:
    """Run-relative folder of a report: ``-o eval/NAME`` or ``-o NAME`` -> ``eval/NAME``."""
    clean = name.strip().strip("/")
    if clean.startswith(f"{EVAL_DIR}/"):
        clean = clean[len(EVAL_DIR) + 1:]
    if not clean or "/" in clean or clean in (".", ".."):
        raise ExarError(f"report name {name!r} must be one folder name under {EVAL_DIR}/ (e.g. -o {EVAL_DIR}/q4)")
    return f"{EVAL_DIR}/{clean}"


def load_questions(run: Run, test: Path | str | None, limit: int | None) -> tuple[list[QA], str]:
    """The held-out questions (the run's test split unless ``test``), and where they came from.

    Both are JSONL of question, answer and optional aliases and context (``exar.data.QA``).
    """
    if test is None:
        run.verify(TEST_SPLIT)
        path, source = run.path(TEST_SPLIT), TEST_SPLIT
    else:
        path, source = Path(test), str(test)
    records = load_qa(path, fmt="jsonl").records
    return (records[:limit] if limit else records), source


def compare(run: Run, variants: str | Sequence[str], *, test: Path | str | None = None, name: str = DEFAULT_NAME,
            settings: CompareSettings = CompareSettings(), loop_overrides: dict | None = None,
            progress: bool = True) -> dict:
    """Generate (or reuse), score and compare ``variants`` on ``run``; write report.{json,md,png}; return the report."""
    from exar.edge.loop import LoopSettings
    from exar.eval.report import write_report
    from exar.prompts import PromptStyle

    chosen = parse_variants(variants if isinstance(variants, str) else ",".join(variants))
    files = {v.name: artifacts(run, v) for v in chosen}  # every variant checked before any work
    questions, source = load_questions(run, test, settings.limit)
    loop = LoopSettings.for_run(run.settings, **(loop_overrides or {}))
    plan = Plan(questions, PromptStyle.from_dict(run.settings.get("prompt") or {}), loop,
                full_loop=settings.what != "answer", threads=settings.threads)
    folder = eval_folder(name)

    collected, reference_teacher = {}, None
    for variant in chosen:
        rows = collect(run, variant, fingerprint(run, files[variant.name]), plan, run.path(folder),
                       reference_teacher, progress=progress)
        reference_teacher = reference_teacher or rows.teacher
        collected[variant.name] = rows

    report = _report(run, chosen, files, collected, plan, settings, source)
    write_report(run, folder, report, made_from=[source] if test is None else [])
    return report


# --- scoring ------------------------------------------------------------------------------------

def _score(answers: list[str], questions: Sequence[QA], settings: CompareSettings) -> dict:
    from exar.metrics import score_rows

    return score_rows(answers, [qa.answer for qa in questions], aliases=[qa.aliases for qa in questions],
                      bertscore_model=settings.bertscore_model, bertscore_num_layers=settings.bertscore_layers,
                      idf=settings.idf, rescale=settings.rescale)


def _labels(per_row: dict, thresholds) -> list[bool]:
    """Held-out correctness of each answer by the train stage's annotate rule over this report's metrics."""
    from exar.prompts import CORRECT
    from exar.train.annotate import label

    return [label(bool(em), p, r, f, bert, thresholds) == CORRECT for em, p, r, f, bert in zip(
        per_row["em_squad"], per_row["rougeL_p"], per_row["rougeL_r"], per_row["rougeL_f"], per_row["bertscore_f"])]


def _variant_rows(results: list[dict], teacher_rows: list[dict], reference: dict | None, questions: Sequence[QA],
                  plan: Plan, settings: CompareSettings, thresholds) -> tuple[dict, dict]:
    """(per-question metric lists, summary) for one variant."""
    from exar.eval.metacognition import metacognition
    from exar.metrics import classification_metrics

    first_rounds = [r["rounds"][0] for r in results]
    answers = [r["stage_zero_answer"] for r in results]
    scored = _score(answers, questions, settings)
    per_row = dict(scored["per_row"])
    labels = _labels(per_row, thresholds)
    loop_labels = None
    verdicts = [fr["p_correct"] is not None and fr["p_correct"] >= plan.loop.threshold for fr in first_rounds]
    ref_answers = answers if reference is None else reference["answers"]
    per_row.update(
        agree=[float(a == b) for a, b in zip(answers, ref_answers)],
        validator_correct=[float(lab == ver) for lab, ver in zip(labels, verdicts)],
        nll=[statistics.fmean(t["nll"]) for t in teacher_rows],
        kl=[statistics.fmean(t["kl"]) if t.get("kl") else 0.0 for t in teacher_rows],
        answer_ms=[fr["ms"] - fr["verdict_ms"] for fr in first_rounds],
    )
    tokens = sum(fr["tokens"] for fr in first_rounds)
    n_target = sum(len(t["nll"]) for t in teacher_rows)
    summary = {
        "answers": answers,
        "corpus_bleu": scored["corpus_bleu"],
        "bertscore": scored["bertscore"],
        "perplexity": exp(sum(sum(t["nll"]) for t in teacher_rows) / n_target),
        "teacher_tokens": n_target,
        "validator": {**classification_metrics(labels, verdicts), "threshold": plan.loop.threshold},
        "latency": {
            "answer_ms_mean": statistics.fmean(per_row["answer_ms"]),
            "answer_ms_median": statistics.median(per_row["answer_ms"]),
            "tokens_per_s": tokens / max(sum(per_row["answer_ms"]), 1e-9) * 1000.0,
            "verdict_ms_mean": statistics.fmean(fr["verdict_ms"] for fr in first_rounds),
        },
    }
    if plan.full_loop:
        finals = [r["answer"] or "" for r in results]
        loop_scored = _score(finals, questions, settings)
        per_row.update({f"loop_{k}": v for k, v in loop_scored["per_row"].items()})
        loop_labels = _labels({k[len("loop_"):]: v for k, v in per_row.items() if k.startswith("loop_")}, thresholds)
        ref_finals = finals if reference is None else reference["finals"]
        per_row.update(
            loop_agree=[float(a == b) for a, b in zip(finals, ref_finals)],
            accepted_first=[float(fr["accepted"]) for fr in first_rounds],
            abstain=[float(r["decision"] == "abstain") for r in results],
            rounds=[float(len(r["rounds"])) for r in results],
            loop_ms=[r["total_ms"] for r in results],
        )
        summary["finals"] = finals
        summary["pipeline"] = {
            "decisions": dict(Counter(r["decision"] for r in results)),
            "accepted_first": statistics.fmean(per_row["accepted_first"]),
            "mean_rounds": statistics.fmean(per_row["rounds"]),
            "abstentions": int(sum(per_row["abstain"])),
            "corpus_bleu": loop_scored["corpus_bleu"],
            "loop_ms_mean": statistics.fmean(per_row["loop_ms"]),
        }
        summary["latency"]["loop_ms_mean"] = summary["pipeline"]["loop_ms_mean"]
    summary["metacognition"] = metacognition(results, labels, loop_labels, plan.loop.threshold,
                                             resamples=settings.resamples, seed=settings.seed,
                                             confidence=settings.confidence)
    return per_row, summary


def _metric_table(full_loop: bool) -> tuple:
    return ANSWER_METRICS + MODEL_METRICS + (PIPELINE_METRICS if full_loop else ())


def label_thresholds(run: Run, settings: CompareSettings):
    """The annotate rule's thresholds for this report's BERTScore backbone: the run's own when it
    annotated with the same backbone, else those recorded for the backbone; and where they came from."""
    from exar.metrics import bertscore_backbone
    from exar.train.annotate import Thresholds

    backbone = bertscore_backbone(settings.bertscore_model, settings.bertscore_layers)
    recorded = run.settings.get("annotate") or {}
    if (recorded.get("bertscore") or {}).get("model") == backbone and recorded.get("thresholds"):
        return Thresholds(**recorded["thresholds"]), f"the run's annotate thresholds ({backbone})"
    return Thresholds.for_backbone(backbone)


def _report(run: Run, chosen: list[Variant], files: dict, collected: dict, plan: Plan, settings: CompareSettings,
            source: str) -> dict:
    from exar.eval.metacognition import sentences as metacognition_sentences

    thresholds, thresholds_from = label_thresholds(run, settings)
    metrics = _metric_table(plan.full_loop)
    reference = chosen[0]
    per_variant, summaries = {}, {}
    for variant in chosen:
        rows = collected[variant.name]
        per_row, summary = _variant_rows(rows.generations, rows.teacher, summaries.get(reference.name),
                                         plan.questions, plan, settings, thresholds)
        per_variant[variant.name], summaries[variant.name] = per_row, summary

    boot = dict(n_resamples=settings.resamples, seed=settings.seed, confidence=settings.confidence)
    ref_rows = per_variant[reference.name]
    headline = HEADLINE[settings.what]
    headline_label = next(label for key, label, _ in metrics if key == headline)
    variants_out, sentences = [], []
    for variant in chosen:
        per_row, summary = per_variant[variant.name], summaries[variant.name]
        differences = {} if variant is reference else {
            key: paired_bootstrap(ref_rows[key], per_row[key], **boot) for key, _, _ in metrics}
        entry = {
            "name": variant.name,
            "reference": variant is reference,
            "runtime": variant.runtime_settings(),
            "files": files[variant.name],
            "bytes": model_bytes(run, variant, files[variant.name]),
            "computed": collected[variant.name].computed,
            "mean": {key: statistics.fmean(per_row[key]) for key, _, _ in metrics},
            "differences": differences,
            **{k: v for k, v in summary.items() if k not in ("answers", "finals", "bertscore")},
        }
        if plan.full_loop:
            entry["pipeline"]["loop_vs_stage_zero"] = paired_bootstrap(
                per_row["bertscore_f"], per_row["loop_bertscore_f"], **boot)
        if variant is not reference:
            agree_key = "loop_agree" if settings.what == "pipeline" else "agree"
            entry["sentence"] = (describe_difference(variant.name, headline_label, differences[headline])
                                 + f"; {entry['mean'][agree_key]:.0%} of answers identical to {reference.name}")
            sentences.append(entry["sentence"])
        entry["metacognition_sentences"] = metacognition_sentences(variant.name, entry["metacognition"])
        variants_out.append(entry)

    return {
        "run": str(run.root),
        "test": {"source": source, "questions": len(plan.questions)},
        "reference_variant": reference.name,
        "what": settings.what,
        "settings": {
            **{k: v for k, v in asdict(settings).items() if k not in ("what", "limit")},
            "limit": settings.limit,
            "loop": asdict(plan.loop_settings),
            "kl": f"KL(reference || variant) over the reference's top {plan.kl_top_k} tokens + one rest bucket, "
                  "mean over the reference answers' tokens (teacher-forced)",
            "validator_labels": "held-out answers labelled by the train stage's annotate rule "
                                f"(exar.train.annotate.label, thresholds {thresholds.to_dict()} from "
                                f"{thresholds_from}) over this report's exact match, ROUGE-L and BERTScore",
        },
        "bertscore": summaries[reference.name]["bertscore"],
        "metrics": [{"key": key, "label": label, "higher_is_better": up} for key, label, up in metrics],
        "variants": variants_out,
        "sentences": sentences,
        "metacognition_sentences": [line for v in variants_out for line in v["metacognition_sentences"]],
        "rows": _question_rows(plan.questions, chosen, per_variant, summaries, collected, metrics),
    }


def _question_rows(questions, chosen, per_variant, summaries, collected, metrics) -> list[dict]:
    rows = []
    for i, qa in enumerate(questions):
        by_variant = {}
        for variant in chosen:
            result = collected[variant.name].generations[i]
            by_variant[variant.name] = {
                "answer": result["stage_zero_answer"],
                "final_answer": result["answer"] if "finals" in summaries[variant.name] else None,
                "decision": result["decision"] if "finals" in summaries[variant.name] else None,
                "p_correct": result["rounds"][0]["p_correct"],
                **{key: per_variant[variant.name][key][i] for key, _, _ in metrics},
            }
        rows.append({"index": i, "question": qa.question, "context": qa.context, "reference": qa.answer,
                     "aliases": qa.aliases, "variants": by_variant})
    return rows
