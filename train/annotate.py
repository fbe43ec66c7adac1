"""DATASET+: every stage-zero prediction labelled CORRECT or WRONG by the paper's later rule.

CORRECT if exact match; or ROUGE-L F > 0.5 and BERTScore F1 >= 0.5; or ROUGE-L P >= 0.6 or
ROUGE-L R >= 0.6; or BERTScore F1 > 0.9; else WRONG. The thresholds and the BERTScore backbone
are settings, recorded in run.json. Rows are deduplicated on (question, prediction), never on the
prediction alone (the paper merged identical answers to different questions).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from exar import constants as C
from exar.data import read_jsonl, write_jsonl
from exar.errors import ExarError
from exar.prompts import CORRECT, LABELS, WRONG
from exar.rundir import Run

EXACT_MATCH_MODE = "squad"


@dataclass(frozen=True)
class Thresholds:
    rouge_match_f: float = C.ROUGE_MATCH_F    # ROUGE-L F > this ...
    bert_match_f1: float = C.BERT_MATCH_F1    # ... and BERTScore F1 >= this
    rouge_solo_pr: float = C.ROUGE_SOLO_PR    # or ROUGE-L precision or recall >= this
    bert_solo_f1: float = C.BERT_SOLO_F1      # or BERTScore F1 > this

    def to_dict(self) -> dict:
        return asdict(self)


def label(exact: bool, rouge_p: float, rouge_r: float, rouge_f: float, bert_f1: float,
          thresholds: Thresholds = Thresholds()) -> str:
    """The labelling rule of EXAR_METHOD.md (step 3), a pure function of the metric values."""
    t = thresholds
    correct = (
        exact
        or (rouge_f > t.rouge_match_f and bert_f1 >= t.bert_match_f1)
        or rouge_p >= t.rouge_solo_pr or rouge_r >= t.rouge_solo_pr
        or bert_f1 > t.bert_solo_f1
    )
    return CORRECT if correct else WRONG


def dedup(rows: Iterable[dict]) -> list[dict]:
    """First row of each (question, prediction) pair."""
    seen, kept = set(), []
    for row in rows:
        key = (row["question"].strip(), row["prediction"].strip())
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def score_and_label(rows: Sequence[dict], thresholds: Thresholds = Thresholds(),
                    bertscore_model: str | None = None, bertscore_layers: int | None = None,
                    batch_size: int = 64) -> tuple[list[dict], dict]:
    """Rows (question, reference, aliases, prediction) with metric columns and ``label``; plus BERTScore info.

    An empty prediction is WRONG without scoring (BERTScore of an empty string is undefined).
    """
    from exar.metrics import bertscore, exact_match, rouge_l

    scored = [r for r in rows if r["prediction"].strip()]
    references = [[r["reference"], *(r.get("aliases") or [])] for r in scored]
    predictions = [r["prediction"] for r in scored]
    info = {}
    if scored:
        rouge = rouge_l(predictions, references)
        _, _, bert_f1, info = bertscore(predictions, references, model=bertscore_model,
                                        num_layers=bertscore_layers, batch_size=batch_size)
    metrics = {}
    for i, row in enumerate(scored):
        p, r, f = rouge[i]
        exact = bool(exact_match(row["prediction"], references[i], mode=EXACT_MATCH_MODE))
        metrics[id(row)] = {"exact_match": exact, "rouge_l_p": p, "rouge_l_r": r, "rouge_l_f": f,
                            "bertscore_f1": bert_f1[i], "label": label(exact, p, r, f, bert_f1[i], thresholds)}
    empty = {"exact_match": False, "rouge_l_p": 0.0, "rouge_l_r": 0.0, "rouge_l_f": 0.0,
             "bertscore_f1": 0.0, "label": WRONG}
    return [{**row, **metrics.get(id(row), empty)} for row in rows], info


def summarize(rows: Sequence[dict], label_field: str = "label") -> dict:
    """Class counts and, for rows carrying a human label (``human``/``HUMAN``), agreement with it."""
    counts = {name: sum(r[label_field] == name for r in rows) for name in LABELS}
    judged = [(r[label_field], _human(r)) for r in rows if _human(r) in LABELS]
    summary = {"rows": len(rows), "counts": counts}
    if judged:
        summary["human_rows"] = len(judged)
        summary["human_agreement"] = sum(a == h for a, h in judged) / len(judged)
    return summary


def _human(row: dict) -> str | None:
    value = row.get("human", row.get("HUMAN"))
    return value.strip().upper() if isinstance(value, str) else None


def annotate(run: Run, *, thresholds: Thresholds = Thresholds(), bertscore_model: str | None = None,
             bertscore_layers: int | None = None, batch_size: int = 64, force: bool = False) -> dict:
    """Label the run's predictions into ``data/dataset-plus.jsonl``; returns the run.json section."""
    if run.has(C.DATASET_PLUS) and not force:
        print(f"annotate: {run.path(C.DATASET_PLUS)} is done (use --force to redo it)", file=sys.stderr)
        return run.settings.get("annotate", {})
    run.verify(C.PRE_DATASET_PLUS)
    predictions = read_jsonl(run.path(C.PRE_DATASET_PLUS))
    if not predictions:
        raise ExarError(f"{run.path(C.PRE_DATASET_PLUS)}: no predictions to annotate")
    unique = dedup(predictions)
    from exar.progress import status

    with status(f"annotate: scoring {len(unique)} predictions (ROUGE-L, BERTScore)"):
        labelled, info = score_and_label(unique, thresholds, bertscore_model, bertscore_layers, batch_size)
    with run.writing(C.DATASET_PLUS, "dataset-plus", made_from=[C.PRE_DATASET_PLUS]) as tmp:
        write_jsonl(tmp, labelled)
    section = {
        "thresholds": thresholds.to_dict(),
        "exact_match": EXACT_MATCH_MODE,
        "bertscore": info,
        "predictions": len(predictions),
        "duplicates_removed": len(predictions) - len(unique),
        **summarize(labelled),
    }
    run.update_settings("annotate", section)
    return section
