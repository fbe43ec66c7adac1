"""exar.metrics' metacognition metrics on small cases computed by hand (ties included)."""

import math

import pytest

from exar.metrics import (accuracy_at_coverage, answer_key, at_threshold, auroc, average_precision, brier,
                          calibration_bins, ece, fit_threshold, is_degenerate, log_softmax, risk_coverage,
                          transitions)


def test_auroc_counts_ties_as_half():
    # right answers score 0.9 and 0.5, wrong ones 0.5 and 0.1: pairs 1 + 1 + 0.5 + 1 out of 4
    assert auroc([0.9, 0.5, 0.5, 0.1], [True, True, False, False]) == pytest.approx(0.875)
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert auroc([0.3, 0.3, 0.3], [True, False, True]) == 0.5          # a score that says nothing
    assert auroc([0.1, 0.9], [True, False]) == 0.0                     # perfectly backwards
    assert math.isnan(auroc([0.2, 0.7], [True, True]))                 # one class: nothing to rank


def test_average_precision_steps_and_ties():
    # thresholds 0.9 (P 1, R 1/2), 0.8 (R unchanged), 0.7 (P 2/3, R 1): 1/2 x 1 + 1/2 x 2/3
    assert average_precision([0.9, 0.8, 0.7, 0.6], [True, False, True, False]) == pytest.approx(0.5 + 1 / 3)
    # the tie at 0.5 enters at once: P 1/3 when recall reaches 1
    assert average_precision([0.9, 0.5, 0.5], [False, True, False]) == pytest.approx(1 / 3)
    assert math.isnan(average_precision([0.9], [False]))


def test_brier_ece_and_the_reliability_bins():
    assert brier([1.0, 0.0, 0.5], [True, True, False]) == pytest.approx((0 + 1 + 0.25) / 3)
    probs, right = [0.05, 0.15, 0.95, 1.0], [False, True, True, False]
    bins = calibration_bins(probs, right)
    assert [(b["n"], round(b["confidence"], 4), b["accuracy"]) for b in bins if b["n"]] == [
        (1, 0.05, 0.0), (1, 0.15, 1.0), (2, 0.975, 0.5)]                # 1.0 falls in the last bin
    # |0 - 0.05| x 1/4 + |1 - 0.15| x 1/4 + |0.5 - 0.975| x 2/4
    assert ece(probs, right) == pytest.approx(0.05 / 4 + 0.85 / 4 + 0.475 / 2)


def test_risk_coverage_aurc_and_accuracy_at_coverage():
    scores, right = [0.9, 0.8, 0.5, 0.5], [True, False, True, False]
    curve = risk_coverage(scores, right)
    # k = 1: 0 errors; k = 2: 1/2; the tie (one right, one wrong) adds half an error per answer taken
    assert curve["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert curve["risk"] == pytest.approx([0.0, 0.5, 1.5 / 3, 0.5])
    assert curve["aurc"] == pytest.approx((0 + 0.5 + 0.5 + 0.5) / 4)
    assert accuracy_at_coverage(scores, right, 0.25) == 1.0
    assert accuracy_at_coverage(scores, right, 0.5) == 0.5
    assert accuracy_at_coverage(scores, right, 0.7) == pytest.approx(0.5)  # ceil(2.8) = 3 answers
    # always accepting (one score for all) gives the plain error rate at every coverage
    assert risk_coverage([0.0] * 4, right)["aurc"] == pytest.approx(0.5)
    perfect = risk_coverage([0.9, 0.1, 0.8, 0.2], right)
    assert perfect["aurc"] == pytest.approx((0 + 0 + 1 / 3 + 2 / 4) / 4)
    with pytest.raises(ValueError, match="coverage"):
        accuracy_at_coverage(scores, right, 0.0)


def test_threshold_fit_objective_and_degenerate_flag():
    scores = [0.9, 0.8, 0.7, 0.45, 0.4, 0.2, 0.65]
    right = [True, True, True, False, False, False, False]
    fit = fit_threshold(scores, right, default=0.5)
    assert fit["threshold"] == pytest.approx(0.675)                    # between 0.65 (wrong) and 0.7 (right)
    assert (fit["objective"], fit["value"], fit["degenerate"]) == ("balanced_accuracy", 1.0, False)
    assert fit["acceptance_rate"] == pytest.approx(3 / 7)
    assert at_threshold(scores, right, 0.5)["balanced_accuracy"] == pytest.approx((1 + 3 / 4) / 2)
    # one low wrong answer, then a tie of 10 right and 9 wrong: the best cut accepts 19 of 20
    lopsided = fit_threshold([0.1] + [0.5] * 19, [False] + [True] * 10 + [False] * 9)
    assert lopsided["acceptance_rate"] == pytest.approx(0.95)
    assert lopsided["degenerate"] and "accepts 95%" in lopsided["warning"]
    missing = fit_threshold([0.3, 0.9], [True, True], default=0.5)
    assert (missing["threshold"], missing["degenerate"]) == (0.5, False)
    assert missing["chosen_by"].startswith("default")
    assert is_degenerate(0.05) and is_degenerate(1.0) and not is_degenerate(0.5)


def test_transitions_and_answer_key():
    t = transitions([True, True, False, False, False], [True, False, True, False, True])
    assert t == {"right_right": 1, "right_wrong": 1, "wrong_right": 2, "wrong_wrong": 1, "net": 1, "n": 5}
    assert answer_key("  The Eiffel  tower!") == answer_key("eiffel tower") == "eiffel tower"
    assert (answer_key("A"), answer_key("  "), answer_key("?!")) == ("a", "", "?!")


def test_log_softmax_rows_sum_to_one():
    import numpy as np

    rows = log_softmax([[1000.0, 0.0], [0.0, 0.0]])  # no overflow
    assert np.exp(rows).sum(axis=-1) == pytest.approx([1.0, 1.0])
    assert rows[1, 0] == pytest.approx(math.log(0.5))
