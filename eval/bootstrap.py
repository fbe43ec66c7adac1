"""Is a variant's score really different from the baseline's, or just noise from a small test set?

Paired bootstrap over per-row scores: both variants answered the same questions, so rows are
resampled together and only the per-question differences matter.
"""

from __future__ import annotations

from typing import Sequence

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
