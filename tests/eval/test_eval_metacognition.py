"""The per-variant metacognition figures: bootstrap intervals and the loop's bookkeeping, by hand."""

import pytest

from exar.eval.bootstrap import bootstrap_statistics
from exar.eval.metacognition import metacognition, per_round_acceptance, sentences
from exar.metrics import auroc


def _result(rounds, answer="x", p=None):
    """A loop result with rounds given as (p_correct, accepted, logprob)."""
    return {"answer": answer, "p_correct": p if p is not None else rounds[-1][0],
            "rounds": [{"p_correct": pc, "accepted": acc, "logprob": lp} for pc, acc, lp in rounds]}


def test_bootstrap_statistics_pair_their_resamples():
    cols = {"s": [0.9, 0.2, 0.7, 0.4, 0.6, 0.1], "y": [True, False, True, False, False, True]}
    out = bootstrap_statistics(cols, {
        "auroc": lambda c: auroc(c["s"], c["y"]),
        "same_twice": lambda c: auroc(c["s"], c["y"]) - auroc(c["s"], c["y"]),
        "share": lambda c: sum(c["y"]) / len(c["y"]),
    }, n_resamples=200, seed=1)
    assert out["auroc"]["value"] == pytest.approx(auroc(cols["s"], cols["y"]))
    assert out["auroc"]["low"] <= out["auroc"]["value"] <= out["auroc"]["high"]
    assert (out["same_twice"]["low"], out["same_twice"]["high"], out["same_twice"]["significant"]) == (0.0, 0.0, False)
    assert out["auroc"]["resamples"] < 200 == out["share"]["resamples"]  # one-class resamples are left out
    again = bootstrap_statistics(cols, {"auroc": lambda c: auroc(c["s"], c["y"])}, n_resamples=200, seed=1)
    assert again["auroc"] == out["auroc"]                                     # seeded


def test_metacognition_of_a_scripted_loop():
    results = [
        _result([(0.9, True, -0.1)]),                                   # right, accepted
        _result([(0.2, False, -2.0), (0.8, True, -0.5)]),               # wrong, then right and accepted
        _result([(0.3, False, -0.3), (0.1, False, -1.5)], p=0.3),       # right, rejected; best = round 1
        _result([(0.7, True, -1.0)]),                                   # wrong, accepted
    ]
    correct = [True, False, True, False]
    loop_correct = [True, True, True, False]
    m = metacognition(results, correct, loop_correct, threshold=0.5, resamples=50, seed=0)
    f = m["figures"]
    # p(CORRECT) of the stage-zero answers 0.9, 0.2, 0.3, 0.7 against right, wrong, right, wrong
    assert f["auroc"]["value"] == pytest.approx(0.75)
    assert f["logprob_auroc"]["value"] == pytest.approx(1.0)     # -0.1, -2.0, -0.3, -1.0
    assert f["auroc_minus_logprob"]["value"] == pytest.approx(-0.25)
    assert f["acceptance_rate"]["value"] == 0.5
    assert (f["stage_zero_accuracy"]["value"], f["loop_accuracy"]["value"]) == (0.5, 0.75)
    assert f["net_change"]["value"] == pytest.approx(0.25)
    assert m["transitions"] == {"right_right": 2, "right_wrong": 0, "wrong_right": 1, "wrong_wrong": 1,
                                "net": 1, "n": 4}
    assert m["per_round"] == [{"round": 1, "reached": 4, "accepted": 2, "rate": 0.5},
                              {"round": 2, "reached": 2, "accepted": 1, "rate": 0.5}]
    # final answers ranked by p 0.9, 0.8, 0.3, 0.7 -> right, right, wrong(0.7), right(0.3)
    assert f["aurc"]["value"] == pytest.approx((0 + 0 + 1 / 3 + 1 / 4) / 4)
    assert f["accuracy_at_0.5"]["value"] == 1.0
    assert not m["degenerate_threshold"]
    text = " ".join(sentences("hf", m))
    assert "validator AUROC 0.75" in text and "turned 1 wrong answers right and 0 right answers wrong" in text
    assert "2 right and 2 wrong answers are too few to rank (at least 5 of each)" in text


@pytest.mark.parametrize("right, n, verdict", [(1, 15, "1 right and 14 wrong answers are too few to rank"),
                                                (20, 40, "the validator beats the free baseline")])
def test_a_verdict_needs_enough_answers_of_each_kind(right, n, verdict):
    """One right answer ranked first gives AUROC 1 and a bootstrap interval [1, 1]: no verdict from that.
    With 20 right and 20 wrong the same perfect ranking against a chance-level log-probability is one."""
    import numpy as np

    correct = [i < right for i in range(n)]
    p = [1.0 - i / n for i in range(n)]                                  # the validator ranks the right ones first
    logprob = list(np.random.default_rng(0).normal(-1.0, 0.5, n))        # no relation to correctness
    m = metacognition([_result([(pc, pc >= 0.5, lp)]) for pc, lp in zip(p, logprob)], correct, None, threshold=0.5,
                      resamples=200, seed=0)
    assert m["figures"]["auroc"]["value"] == 1.0
    assert verdict in sentences("hf", m)[0]
    assert ("beats" in sentences("hf", m)[0]) == (right == 20)


def test_per_round_acceptance_counts_only_questions_that_got_there():
    assert per_round_acceptance([_result([(0.1, False, None), (0.2, False, None), (0.9, True, None)])]) == [
        {"round": 1, "reached": 1, "accepted": 0, "rate": 0.0},
        {"round": 2, "reached": 1, "accepted": 0, "rate": 0.0},
        {"round": 3, "reached": 1, "accepted": 1, "rate": 1.0}]
