"""exar.eval.bootstrap: the paired bootstrap and the sentence the report prints from it."""

import re

import numpy as np
import pytest

from exar.eval.bootstrap import describe_difference, paired_bootstrap


@pytest.fixture
def shifted_pairs():
    """Scores that vary a lot between questions, with the variant 0.1 better on each (+ small noise)."""
    rng = np.random.default_rng(123)
    baseline = rng.uniform(0, 1, size=200)
    variant = baseline + 0.1 + rng.normal(0, 0.05, size=200)
    return baseline.tolist(), variant.tolist()


def test_deterministic_for_a_seed(shifted_pairs):
    baseline, variant = shifted_pairs
    assert paired_bootstrap(baseline, variant, seed=7) == paired_bootstrap(baseline, variant, seed=7)
    assert paired_bootstrap(baseline, variant, seed=7) != paired_bootstrap(baseline, variant, seed=8)


def test_known_shift_is_found_and_pairing_keeps_the_interval_narrow(shifted_pairs):
    baseline, variant = shifted_pairs
    result = paired_bootstrap(baseline, variant)
    assert result["diff"] == pytest.approx(np.mean(variant) - np.mean(baseline))
    assert result["low"] < 0.1 < result["high"]
    assert result["low"] > 0 and result["significant"]
    # Paired, only the 0.05 noise counts: width ~ 2 * 1.96 * 0.05 / sqrt(200) ~ 0.014. Resampling
    # the two lists independently would see the 0-1 spread between questions (width ~ 0.11).
    assert result["high"] - result["low"] < 0.03


def test_identical_inputs_give_exactly_zero():
    scores = [0.3, 0.9, 0.1, 0.5]
    result = paired_bootstrap(scores, list(scores))
    assert (result["diff"], result["low"], result["high"], result["significant"]) == (0.0, 0.0, 0.0, False)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_bootstrap([], [])
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [float("nan")])
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [2.0], confidence=1.0)


def test_describe_difference_words():
    no_difference = {"diff": -0.004, "low": -0.009, "high": 0.001, "significant": False}
    assert (
        describe_difference("q4_0", "BERTScore F1", no_difference)
        == "q4_0: BERTScore F1 -0.004 [-0.009, +0.001]; no significant difference"
    )
    drop = {"diff": -0.02, "low": -0.03, "high": -0.01, "significant": True}
    assert describe_difference("q4_0", "BERTScore F1", drop).endswith("; significant loss")
    assert describe_difference("q4_0", "perplexity", drop, higher_is_better=False).endswith(
        "; significant gain"
    )
    rise = {"diff": 12.54, "low": 8.31, "high": 16.69, "significant": True}
    assert (
        describe_difference("q8_0", "latency ms", rise, higher_is_better=False, digits=1)
        == "q8_0: latency ms +12.5 [+8.3, +16.7]; significant loss"
    )


def test_describe_a_real_bootstrap(shifted_pairs):
    baseline, variant = shifted_pairs
    sentence = describe_difference("f16", "token F1", paired_bootstrap(baseline, variant))
    assert re.fullmatch(r"f16: token F1 \+0\.\d{3} \[\+0\.\d{3}, \+0\.\d{3}\]; significant gain", sentence)
