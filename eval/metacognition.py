"""Does the model know when it is wrong? The validator and the loop, measured on held-out answers.

For one variant's loop results and the correctness of its answers (the annotate rule over the
report's metrics), every figure comes with a bootstrap 95% interval over questions:

- the validator on the stage-zero answers: AUROC and AUPRC of p(CORRECT), Brier, ECE with its
  reliability bins, and balanced accuracy / precision / recall / acceptance rate at the threshold;
- two free baselines on the same answers: always accept, and the answer model's own confidence
  (the mean token log-probability of its answer, a by-product of generating it); the validator's
  AUROC minus the log-probability's gets a paired interval;
- the loop's final answers: the risk-coverage curve and AURC (answers ranked by p(CORRECT),
  abstaining on the lowest), accuracy at 50/70/90% coverage, the stage-zero -> loop transition
  matrix and per-round acceptance.

The metric functions themselves live in the spine (``exar.metrics``).
"""

from __future__ import annotations

from typing import Sequence

from exar.eval.bootstrap import bootstrap_statistics
from exar.metrics import (COVERAGES, MIN_PER_CLASS, accuracy_at_coverage, at_threshold, auroc, average_precision,
                          brier, calibration_bins, ece, is_degenerate, risk_coverage, transitions)

LOWEST = -1e9  # the score of an answer that has none (empty, abstained): ranked last


def _score(value: float | None) -> float:
    return LOWEST if value is None else float(value)


def _chosen_round(result: dict) -> dict | None:
    """The round whose answer the loop returned (None when it abstained)."""
    if result["answer"] is None:
        return None
    return next((r for r in result["rounds"] if r["accepted"]), None) or max(
        (r for r in result["rounds"] if r["p_correct"] is not None), key=lambda r: r["p_correct"], default=None)


def columns(results: Sequence[dict], correct: Sequence[bool], loop_correct: Sequence[bool] | None) -> dict:
    """Per-question columns: p(CORRECT) and log-probability of the stage-zero answer and of the
    loop's final one, and whether each was right."""
    first = [r["rounds"][0] for r in results]
    cols = {"p": [_score(f["p_correct"]) for f in first], "logprob": [_score(f.get("logprob")) for f in first],
            "right": [bool(c) for c in correct]}
    if loop_correct is not None:
        chosen = [_chosen_round(r) for r in results]
        cols.update(final_p=[_score(r["p_correct"]) for r in results],
                    final_logprob=[_score(c.get("logprob") if c else None) for c in chosen],
                    final_right=[bool(c) for c in loop_correct])
    return cols


def _statistics(threshold: float, loop: bool) -> dict:
    """name -> function of the (resampled) columns."""
    def validator(metric):
        return lambda c: at_threshold(c["p"], c["right"], threshold)[metric]

    stats = {
        "auroc": lambda c: auroc(c["p"], c["right"]),
        "auprc": lambda c: average_precision(c["p"], c["right"]),
        "brier": lambda c: brier(c["p"], c["right"]),
        "ece": lambda c: ece(c["p"], c["right"]),
        "balanced_accuracy": validator("balanced_accuracy"),
        "precision": validator("precision"),
        "recall": validator("recall"),
        "acceptance_rate": validator("acceptance_rate"),
        "stage_zero_accuracy": lambda c: sum(c["right"]) / len(c["right"]),
        "logprob_auroc": lambda c: auroc(c["logprob"], c["right"]),
        "logprob_auprc": lambda c: average_precision(c["logprob"], c["right"]),
        "auroc_minus_logprob": lambda c: auroc(c["p"], c["right"]) - auroc(c["logprob"], c["right"]),
    }
    if loop:
        stats.update({
            "loop_accuracy": lambda c: sum(c["final_right"]) / len(c["final_right"]),
            "net_change": lambda c: (sum(c["final_right"]) - sum(c["right"])) / len(c["right"]),
            "aurc": lambda c: risk_coverage(c["final_p"], c["final_right"])["aurc"],
            "logprob_aurc": lambda c: risk_coverage(c["final_logprob"], c["final_right"])["aurc"],
            "always_accept_aurc": lambda c: risk_coverage([0.0] * len(c["final_right"]), c["final_right"])["aurc"],
        })
        for coverage in COVERAGES:
            stats[f"accuracy_at_{coverage:g}"] = (
                lambda c, cov=coverage: accuracy_at_coverage(c["final_p"], c["final_right"], cov))
            stats[f"logprob_accuracy_at_{coverage:g}"] = (
                lambda c, cov=coverage: accuracy_at_coverage(c["final_logprob"], c["final_right"], cov))
        stats["selective_gain_at_0.7"] = (
            lambda c: accuracy_at_coverage(c["final_p"], c["final_right"], 0.7) - sum(c["final_right"]) / len(c["final_right"]))
    return stats


def per_round_acceptance(results: Sequence[dict]) -> list[dict]:
    """For each round: how many questions reached it, and how many of their answers it accepted."""
    most = max((len(r["rounds"]) for r in results), default=0)
    rows = []
    for number in range(1, most + 1):
        reached = [r["rounds"][number - 1] for r in results if len(r["rounds"]) >= number]
        accepted = sum(bool(r["accepted"]) for r in reached)
        rows.append({"round": number, "reached": len(reached), "accepted": accepted,
                     "rate": accepted / len(reached) if reached else 0.0})
    return rows


def metacognition(results: Sequence[dict], correct: Sequence[bool], loop_correct: Sequence[bool] | None,
                  threshold: float, *, resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Every figure of the module docstring for one variant (``loop_correct`` None: stage-zero only)."""
    cols = columns(results, correct, loop_correct)
    loop = loop_correct is not None
    figures = bootstrap_statistics(cols, _statistics(threshold, loop), n_resamples=resamples, seed=seed,
                                   confidence=confidence)
    acceptance = figures["acceptance_rate"]["value"]
    out = {
        "n": len(cols["right"]), "right": sum(cols["right"]), "threshold": threshold,
        "degenerate_threshold": is_degenerate(acceptance),
        "figures": figures,
        "reliability": calibration_bins(cols["p"], cols["right"]),
        "baselines": {
            "logprob": "the answer model's own mean token log-probability of its answer (free from generation)",
            "always_accept": "accept every answer: AUROC 0.5, acceptance rate 1, accuracy = stage-zero accuracy",
        },
    }
    if loop:
        curves = {name: risk_coverage(cols[key], cols["final_right"]) for name, key in
                  (("validator", "final_p"), ("logprob", "final_logprob"))}
        out.update(
            transitions=transitions(cols["right"], cols["final_right"]),
            per_round=per_round_acceptance(results),
            risk_coverage={name: {"coverage": c["coverage"], "risk": c["risk"]} for name, c in curves.items()},
        )
    return out


def _interval(figure: dict, digits: int = 2) -> str:
    if figure["value"] is None:
        return "n/a"
    if figure["low"] is None:
        return f"{figure['value']:.{digits}f}"
    return f"{figure['value']:.{digits}f} [{figure['low']:.{digits}f}, {figure['high']:.{digits}f}]"


def _signed(figure: dict, digits: int = 2) -> str:
    if figure["value"] is None or figure["low"] is None:
        return "n/a"
    return f"{figure['value']:+.{digits}f} [{figure['low']:+.{digits}f}, {figure['high']:+.{digits}f}]"


def sentences(name: str, report: dict) -> list[str]:
    """What a reader should take away, in plain words, with the intervals."""
    f = report["figures"]
    diff = f["auroc_minus_logprob"]
    wrong = report["n"] - report["right"]
    if min(report["right"], wrong) < MIN_PER_CLASS:  # a bootstrap over one or two right answers is all ties
        verdict = (f"cannot be compared with the free baseline: {report['right']} right and {wrong} wrong answers "
                   f"are too few to rank (at least {MIN_PER_CLASS} of each)")
    elif diff["value"] is None or diff["low"] is None:
        verdict = "cannot be compared with the free baseline (one class missing)"
    elif diff["significant"] and diff["value"] > 0:
        verdict = "beats the free baseline"
    elif diff["significant"]:
        verdict = "is worse than the free baseline"
    else:
        verdict = "does not significantly beat the free baseline"
    lines = [f"{name}: validator AUROC {_interval(f['auroc'])} on {report['n']} held-out answers ({report['right']} right) "
             f"vs {_interval(f['logprob_auroc'])} for the answer's own token log-probability: "
             f"{_signed(diff)}; the validator {verdict}"]
    if report["degenerate_threshold"]:
        lines.append(f"{name}: the threshold {report['threshold']:.3f} accepts "
                     f"{f['acceptance_rate']['value']:.0%} of the answers (degenerate: the loop barely acts)")
    if "transitions" in report:
        t = report["transitions"]
        lines.append(f"{name}: the loop turned {t['wrong_right']} wrong answers right and {t['right_wrong']} right "
                     f"answers wrong (net {t['net']:+d} of {t['n']}); accuracy {f['stage_zero_accuracy']['value']:.2f} "
                     f"-> {f['loop_accuracy']['value']:.2f}; answering only the 70% it trusts most: "
                     f"{_interval(f['accuracy_at_0.7'])} ({_signed(f['selective_gain_at_0.7'])} vs answering all)")
    return lines
