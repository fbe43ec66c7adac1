"""Is a variant's score really different from the baseline's, or just noise from a small test set?

Paired bootstrap over per-row scores: both variants answered the same questions, so rows are
resampled together and only the per-question differences matter.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Mean difference b - a with a percentile confidence interval over resampled questions.

    `significant` is True when the interval excludes 0. Identical inputs give exactly
    diff = low = high = 0.0. The resampling holds n_resamples x len(a) indices in memory.
    """
    baseline = np.asarray(a, dtype=float)
    variant = np.asarray(b, dtype=float)
    if baseline.ndim != 1 or baseline.shape != variant.shape:
        raise ValueError(
            f"paired scores need two flat lists of one length, got {baseline.shape} and {variant.shape}"
        )
    if baseline.size == 0:
        raise ValueError("paired scores are empty")
    if not (np.isfinite(baseline).all() and np.isfinite(variant).all()):
        raise ValueError("paired scores contain NaN or infinity")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")

    differences = variant - baseline
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, differences.size, size=(n_resamples, differences.size))
    resampled_means = differences[rows].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(resampled_means, [tail, 1 - tail])
    return {
        "diff": float(differences.mean()),
        "low": float(low),
        "high": float(high),
        "significant": bool(low > 0 or high < 0),
        "n": int(differences.size),
        "n_resamples": n_resamples,
        "confidence": confidence,
        "seed": seed,
    }


def describe_difference(
    name: str, metric: str, result: dict, higher_is_better: bool = True, digits: int = 3
) -> str:
    """One sentence for the report, with the interval and a verdict.

    e.g. "q4_0: BERTScore F1 -0.004 [-0.009, +0.001]; no significant difference".
    Set `higher_is_better=False` for perplexity, KL divergence or latency, where a rise is a loss.
    """
    if not result["significant"]:
        verdict = "no significant difference"
    elif (result["diff"] > 0) == higher_is_better:
        verdict = "significant gain"
    else:
        verdict = "significant loss"
    diff, low, high = (f"{result[key]:+.{digits}f}" for key in ("diff", "low", "high"))
    return f"{name}: {metric} {diff} [{low}, {high}]; {verdict}"


def bootstrap_statistics(
    columns: Mapping[str, Sequence],
    statistics: Mapping[str, Callable[[Mapping[str, list]], float]],
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict]:
    """Each statistic of the per-question ``columns``, with a percentile interval over resampled questions.

    All statistics are computed on the SAME resamples (rows resampled together across columns),
    so a statistic that is a difference of two others (validator vs a baseline on the same
    answers) gets a paired interval. A resample where a statistic is undefined (NaN: an AUROC
    with one class missing) is left out of that statistic's interval; ``resamples`` says how many
    counted. ``significant`` is True when the interval excludes 0 (meaningful for differences).
    """
    lengths = {len(values) for values in columns.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"columns must be non-empty and of one length, got lengths {sorted(lengths)}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    (n,) = lengths
    data = {name: list(values) for name, values in columns.items()}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_resamples, n))
    samples: dict[str, list[float]] = {name: [] for name in statistics}
    for rows in draws:
        resampled = {name: [values[i] for i in rows] for name, values in data.items()}
        for name, statistic in statistics.items():
            value = float(statistic(resampled))
            if np.isfinite(value):
                samples[name].append(value)
    tail = (1 - confidence) / 2
    out = {}
    for name, statistic in statistics.items():
        value = float(statistic(data))
        kept = samples[name]
        low, high = (float(q) for q in np.quantile(kept, [tail, 1 - tail])) if kept else (float("nan"),) * 2
        out[name] = {"value": value if np.isfinite(value) else None,
                     "low": low if kept else None, "high": high if kept else None,
                     "significant": bool(kept) and (low > 0 or high < 0),
                     "n": n, "resamples": len(kept), "confidence": confidence, "seed": seed}
    return out
