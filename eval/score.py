"""Score any predictions file with the metrics ``compare`` uses (``exar-eval score``).

Predictions and references pair up record by record: two files of the same length, or one file
holding both fields (the paper's labelled files keep ``Generated_Response`` beside ``response``).
"""

from __future__ import annotations

from pathlib import Path

from exar.data import read_jsonl
from exar.errors import ExarError

DEFAULT_PREDICTION_FIELD = "prediction"
DEFAULT_REFERENCE_FIELD = "answer"
DEFAULT_ALIASES_FIELD = "aliases"


def _texts(rows: list[dict], path: Path, field: str, option: str, *, allow_empty: bool) -> list[str]:
    texts = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or field not in row:
            raise ExarError(f"{path}: record {number} has no field {field!r} (name the field with {option})")
        value = row[field]
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            kind = "string" if allow_empty else "non-empty string"
            raise ExarError(f"{path}: record {number}: field {field!r} must be a {kind}")
        texts.append(value)
    return texts


def _aliases(rows: list[dict], path: Path, field: str) -> list[list[str]]:
    out = []
    for number, row in enumerate(rows, 1):
        value = row.get(field) or []
        if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
            raise ExarError(f"{path}: record {number}: field {field!r} must be a list of strings")
        out.append(value)
    return out


def score_file(predictions: Path | str, references: Path | str | None = None, *,
               prediction_field: str = DEFAULT_PREDICTION_FIELD, reference_field: str = DEFAULT_REFERENCE_FIELD,
               aliases_field: str = DEFAULT_ALIASES_FIELD, bertscore_model: str | None = None,
               bertscore_layers: int | None = None, idf: bool = False, rescale: bool = False) -> dict:
    """Every answer metric of ``predictions`` against ``references`` (default: the same file).

    Returns ``score_rows``' result plus ``rows``, ``counts`` (exact matches) and the annotate
    rule's label per record (``per_row["label"]``).
    """
    from exar.metrics import score_rows
    from exar.train.annotate import label

    predictions = Path(predictions)
    references = Path(references) if references is not None else predictions
    pred_rows = read_jsonl(predictions)
    ref_rows = pred_rows if references == predictions else read_jsonl(references)
    if not pred_rows:
        raise ExarError(f"{predictions}: no records")
    if len(pred_rows) != len(ref_rows):
        raise ExarError(f"{predictions} has {len(pred_rows)} records but {references} has {len(ref_rows)}; "
                        "predictions and references must pair up record by record")
    preds = _texts(pred_rows, predictions, prediction_field, "--prediction-field", allow_empty=True)
    refs = _texts(ref_rows, references, reference_field, "--reference-field", allow_empty=False)
    scored = score_rows(preds, refs, aliases=_aliases(ref_rows, references, aliases_field),
                        bertscore_model=bertscore_model, bertscore_num_layers=bertscore_layers, idf=idf,
                        rescale=rescale)
    per_row = scored["per_row"]
    per_row["label"] = [label(bool(em), p, r, f, bert) for em, p, r, f, bert in zip(
        per_row["em_squad"], per_row["rougeL_p"], per_row["rougeL_r"], per_row["rougeL_f"], per_row["bertscore_f"])]
    return {
        **scored,
        "predictions": str(predictions),
        "references": str(references),
        "rows": len(preds),
        "counts": {"em_lower": int(sum(per_row["em_lower"])), "em_squad": int(sum(per_row["em_squad"])),
                   "CORRECT": per_row["label"].count("CORRECT")},
    }


def scored_rows(predictions: Path | str, result: dict) -> list[dict]:
    """The prediction records with their metric columns added (for ``exar-eval score -o``)."""
    rows = read_jsonl(predictions)
    names = list(result["per_row"])
    return [{**row, **{f"exar_{name}": result["per_row"][name][i] for name in names}} for i, row in enumerate(rows)]
