"""Teacher-forced scores: log-softmax, NLL and the top-k + rest KL."""

import numpy as np
import pytest

from exar.eval.teacher import kl_divergence, token_nll, top_support
from exar.metrics import log_softmax


@pytest.fixture
def two_distributions():
    rng = np.random.default_rng(0)
    return log_softmax(rng.normal(size=(3, 40)) * 3), log_softmax(rng.normal(size=(3, 40)) * 3)


def test_log_softmax_normalizes_and_keeps_differences():
    logits = np.array([[1000.0, 1001.0, 999.0]])  # would overflow a naive exp
    out = log_softmax(logits)
    assert np.exp(out).sum() == pytest.approx(1.0, abs=1e-12)
    assert out[0, 1] - out[0, 0] == pytest.approx(1.0, abs=1e-12)


def test_kl_over_the_whole_vocabulary_is_the_exact_kl(two_distributions):
    p, q = two_distributions
    ids, values = top_support(p, k=40)
    exact = (np.exp(p) * (p - q)).sum(axis=-1)
    assert kl_divergence(ids, values, q) == pytest.approx(exact.tolist(), abs=1e-12)


def test_top_k_kl_is_a_lower_bound_and_zero_against_itself(two_distributions):
    p, q = two_distributions
    ids, values = top_support(p, k=5)
    exact = (np.exp(p) * (p - q)).sum(axis=-1)
    coarse = np.array(kl_divergence(ids, values, q))
    assert (coarse > 0).all() and (coarse <= exact + 1e-12).all()
    assert kl_divergence(ids, values, p) == [0.0, 0.0, 0.0]
    # the top ids come out most likely first
    assert all(row == sorted(row, reverse=True) for row in values)


def test_kl_by_hand_with_a_rest_bucket():
    # P = (0.5, 0.3, 0.2), Q = (0.25, 0.25, 0.5); top-1 of P plus the rest: P' = (0.5, 0.5), Q' = (0.25, 0.75).
    p, q = np.log([[0.5, 0.3, 0.2]]), np.log([[0.25, 0.25, 0.5]])
    ids, values = top_support(p, k=1)
    assert ids == [[0]]
    expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    assert kl_divergence(ids, values, q)[0] == pytest.approx(expected, abs=1e-12)


def test_token_nll_reads_the_row_before_each_target():
    logprobs = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    assert token_nll(logprobs, [7, 7, 0, 2], n_prompt=2) == pytest.approx([np.log(2), -np.log(0.8)])
