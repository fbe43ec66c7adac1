"""Teacher-forced scores of the reference answers: perplexity, and KL divergence against the reference variant.

Each question's stage-zero prompt is followed by its reference answer as training renders it
(``render_completion``: the answer and its end marker). The reference variant tokenizes that text
once (``exar.prompts.completion_ids``, the rule training masks the loss with); every other variant
reads the SAME ids, so all positions line up.

KL(P_ref || P_variant) is taken per target position over the reference's ``top_k`` most likely
tokens plus one bucket holding the rest of the vocabulary. That is the exact KL of the two
distributions coarsened to k + 1 outcomes, a lower bound of the full-vocabulary KL that is tight
when the reference puts its mass on few tokens; it keeps the cache to k numbers per position
instead of the whole vocabulary.
"""

from __future__ import annotations

from typing import Sequence

KL_TOP_K = 32
_TINY = 1e-300


def token_nll(logprobs, ids: Sequence[int], n_prompt: int) -> list[float]:
    """-log p of each target token; ``logprobs`` row j predicts ``ids[n_prompt + j]``."""
    return [-float(row[token]) for row, token in zip(logprobs, ids[n_prompt:])]


def top_support(logprobs, k: int = KL_TOP_K) -> tuple[list[list[int]], list[list[float]]]:
    """The k most likely token ids per position and their log-probabilities (the reference's side of KL)."""
    import numpy as np

    k = min(k, logprobs.shape[-1])
    top = np.argsort(-logprobs, axis=-1, kind="stable")[:, :k]
    values = np.take_along_axis(logprobs, top, axis=-1)
    return top.tolist(), values.tolist()


def _rest_mass(log_probs):
    """Probability of every token outside the given ones, per position."""
    import numpy as np

    return np.clip(1.0 - np.exp(log_probs).sum(axis=-1), 0.0, 1.0)


def kl_divergence(ref_ids: Sequence[Sequence[int]], ref_logprobs: Sequence[Sequence[float]], logprobs) -> list[float]:
    """KL(P_ref || P) per position over the reference's top-k tokens + a rest bucket (see the module docstring)."""
    import numpy as np

    log_p = np.asarray(ref_logprobs, dtype=np.float64)
    log_q = np.take_along_axis(np.asarray(logprobs, dtype=np.float64), np.asarray(ref_ids, dtype=np.int64), axis=-1)
    p_rest, q_rest = _rest_mass(log_p), _rest_mass(log_q)
    top_terms = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    log_ratio = np.log(np.maximum(p_rest, _TINY)) - np.log(np.maximum(q_rest, _TINY))
    rest_term = np.where(p_rest > 0, p_rest * log_ratio, 0.0)
    return np.maximum(top_terms + rest_term, 0.0).tolist()
