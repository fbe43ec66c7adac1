"""DATASET+: every stage-zero prediction labelled CORRECT or WRONG by the paper's later rule.

CORRECT if exact match; or ROUGE-L F > a and BERTScore F1 >= b; or ROUGE-L P >= c or ROUGE-L R >= c;
or BERTScore F1 > d; else WRONG. The paper's a, b, c, d = 0.5, 0.5, 0.6, 0.9 were tuned for
deberta-v2-xxlarge-mnli; the thresholds of each BERTScore backbone live in
``exar.constants.ANNOTATION_THRESHOLDS`` (the offline MiniLM default's fitted on human labels).
Thresholds and backbone are recorded in run.json. Rows are deduplicated on (question,
prediction), never on the prediction alone (the paper merged identical answers to different
questions).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace
from typing import Iterable, Mapping, Sequence

from exar import constants as C
from exar.data import read_jsonl, write_jsonl
from exar.errors import ExarError
from exar.prompts import CORRECT, LABELS, WRONG
from exar.rundir import Run, writes_run

EXACT_MATCH_MODE = "squad"


_PAPER = C.ANNOTATION_THRESHOLDS[C.PAPER_BACKBONE]


@dataclass(frozen=True)
class Thresholds:
    """The rule's four thresholds; the defaults are the paper's (for deberta-v2-xxlarge-mnli)."""

    rouge_match_f: float = _PAPER["rouge_match_f"]    # ROUGE-L F > this ...
    bert_match_f1: float = _PAPER["bert_match_f1"]    # ... and BERTScore F1 >= this
    rouge_solo_pr: float = _PAPER["rouge_solo_pr"]    # or ROUGE-L precision or recall >= this
    bert_solo_f1: float = _PAPER["bert_solo_f1"]      # or BERTScore F1 > this

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_backbone(cls, backbone: str, overrides: Mapping[str, float] | None = None) -> tuple["Thresholds", str]:
        """The thresholds recorded for a BERTScore backbone (``bertscore_backbone``'s name, version
        ignored), with ``overrides`` on top; and where they came from, for run.json."""
        name = backbone.split("==")[0]
        if name in C.ANNOTATION_THRESHOLDS:
            thresholds = cls(**C.ANNOTATION_THRESHOLDS[name])
            source = f"exar.constants.ANNOTATION_THRESHOLDS[{name!r}]"
        else:
            thresholds = cls()
            source = f"the paper's values (tuned for {C.PAPER_BACKBONE}; none recorded for {name})"
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        if given:
            thresholds = replace(thresholds, **given)
            source += " with " + ", ".join(f"{k}={v}" for k, v in sorted(given.items()))
        return thresholds, source


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


@writes_run("annotate")
def annotate(run: Run, *, overrides: Mapping[str, float] | None = None, bertscore_model: str | None = None,
             bertscore_layers: int | None = None, batch_size: int = 64, force: bool = False) -> dict:
    """Label the run's predictions into ``data/dataset-plus.jsonl``; returns the run.json section.

    The thresholds are the backbone's (``Thresholds.for_backbone``), with ``overrides`` on top.
    """
    if run.done(C.DATASET_PLUS, force=force):
        print(f"annotate: {run.path(C.DATASET_PLUS)} is done (use --force to redo it)", file=sys.stderr)
        return run.settings.get("annotate", {})
    run.verify(C.PRE_DATASET_PLUS)
    predictions = read_jsonl(run.path(C.PRE_DATASET_PLUS))
    if not predictions:
        raise ExarError(f"{run.path(C.PRE_DATASET_PLUS)}: no predictions to annotate")
    unique = dedup(predictions)
    from exar.metrics import bertscore_backbone
    from exar.progress import status

    thresholds, source = Thresholds.for_backbone(bertscore_backbone(bertscore_model, bertscore_layers), overrides)
    with status(f"annotate: scoring {len(unique)} predictions (ROUGE-L, BERTScore)"):
        labelled, info = score_and_label(unique, thresholds, bertscore_model, bertscore_layers, batch_size)
    with run.writing(C.DATASET_PLUS, "dataset-plus", made_from=[C.PRE_DATASET_PLUS]) as tmp:
        write_jsonl(tmp, labelled)
    section = {
        "thresholds": thresholds.to_dict(),
        "thresholds_from": source,
        "exact_match": EXACT_MATCH_MODE,
        "bertscore": info,
        "predictions": len(predictions),
        "duplicates_removed": len(predictions) - len(unique),
        **summarize(labelled),
        "by_split": {split: summarize([r for r in labelled if r.get("split", "train") == split])["counts"]
                     for split in ("train", "dev")},
    }
    run.update_settings("annotate", section)
    return section
