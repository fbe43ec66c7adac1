"""Fit the DATASET+ labelling rule's thresholds for a BERTScore backbone on human labels.

The paper tuned its rule (EXAR_METHOD.md, step 3) for deberta-v2-xxlarge-mnli; a MiniLM F1 sits on
another scale, so exar fits the four thresholds per backbone on the human-labelled rows of
../shared/data/exar-seed (dolly and SQuAD predictions with a HUMAN label, deduplicated on
(question, prediction)). Agreement with HUMAN is estimated by 5-fold cross-validation over
question-disjoint folds (fit on four folds, count agreement on the fifth), with a bootstrap
interval over questions; the thresholds exar records are then fitted on every row.

    python bench/annotation_thresholds.py [--bertscore-model PATH --bertscore-layers N]

Prints the thresholds to put in ``exar.constants.ANNOTATION_THRESHOLDS`` and the figures for
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
from pathlib import Path

import numpy as np

SEED_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "exar-seed"
FILES = ("dolly_preds_T0.1_labelled.jsonl", "dolly_preds_T0.6_labelled.jsonl", "dolly_preds_T0.8_labelled.jsonl",
         "squad_preds_T0.1_labelled.jsonl", "squad_preds_T0.6_labelled.jsonl", "squad_preds_T0.8_labelled.jsonl")
GRID = {
    "rouge_match_f": np.round(np.arange(0.3, 0.71, 0.1), 3),
    "bert_match_f1": np.round(np.arange(0.3, 0.91, 0.05), 3),
    "rouge_solo_pr": np.round(np.arange(0.4, 0.81, 0.1), 3),
    "bert_solo_f1": np.round(np.arange(0.6, 1.001, 0.025), 3),
}
FOLDS = 5


def human_rows(seed_dir: Path = SEED_DIR) -> list[dict]:
    """(question, reference, prediction, human) of every human-labelled non-empty answer, deduplicated."""
    rows, seen = [], set()
    for name in FILES:
        for line in (seed_dir / name).read_text(encoding="utf-8").splitlines():
            raw = json.loads(line)
            human = (raw.get("HUMAN") or "").strip().upper()
            if human not in ("CORRECT", "WRONG") or not (raw.get("Generated_Response") or "").strip():
                continue  # unlabelled, or an empty answer (WRONG by the rule without scoring)
            question = raw.get("instruction") or raw.get("question")
            reference = raw.get("response") or raw.get("answer_text")
            prediction = raw.get("Generated_Response") or ""
            key = (question.strip(), prediction.strip())
            if key in seen:
                continue
            seen.add(key)
            rows.append({"question": question, "reference": reference, "prediction": prediction,
                         "human": human == "CORRECT", "source": name.split("_")[0]})
    return rows


def metric_columns(rows: list[dict], model, layers) -> dict:
    from exar.metrics import bertscore, exact_match, rouge_l

    preds = [r["prediction"] for r in rows]
    refs = [r["reference"] for r in rows]
    rouge = rouge_l(preds, refs)
    _, _, bert_f1, info = bertscore(preds, refs, model=model, num_layers=layers)
    return {"exact": np.array([bool(exact_match(p, r, mode="squad")) for p, r in zip(preds, refs)]),
            "rouge_p": np.array([x[0] for x in rouge]), "rouge_r": np.array([x[1] for x in rouge]),
            "rouge_f": np.array([x[2] for x in rouge]), "bert_f1": np.array(bert_f1), "info": info}


def rule(cols: dict, t: dict, index=slice(None)) -> np.ndarray:
    """exar.train.annotate.label, vectorized (the test checks the two agree)."""
    return (cols["exact"][index]
            | ((cols["rouge_f"][index] > t["rouge_match_f"]) & (cols["bert_f1"][index] >= t["bert_match_f1"]))
            | (cols["rouge_p"][index] >= t["rouge_solo_pr"]) | (cols["rouge_r"][index] >= t["rouge_solo_pr"])
            | (cols["bert_f1"][index] > t["bert_solo_f1"]))


def fit(cols: dict, human: np.ndarray, index: np.ndarray) -> tuple[dict, float]:
    """The grid point with the most agreement on ``index`` (ties: the paper's values, then the smallest)."""
    paper = {"rouge_match_f": 0.5, "bert_match_f1": 0.5, "rouge_solo_pr": 0.6, "bert_solo_f1": 0.9}
    best, best_key = None, None
    for values in itertools.product(*GRID.values()):
        t = dict(zip(GRID, map(float, values)))
        agree = float((rule(cols, t, index) == human[index]).mean())
        distance = sum(abs(t[k] - paper[k]) for k in t)
        key = (agree, -distance)
        if best_key is None or key > best_key:
            best, best_key = t, key
    return best, best_key[0]


def folds(rows: list[dict]) -> np.ndarray:
    """Fold number per row: a seeded hash of the question, so a question is in one fold only."""
    return np.array([int(hashlib.sha256(r["question"].strip().lower().encode()).hexdigest(), 16) % FOLDS
                     for r in rows])


def bootstrap_by_question(hits: np.ndarray, rows: list[dict], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    questions = sorted({r["question"] for r in rows})
    position = {q: i for i, q in enumerate(questions)}
    groups = np.array([position[r["question"]] for r in rows])
    per_q_hits = np.bincount(groups, weights=hits.astype(float), minlength=len(questions))
    per_q_rows = np.bincount(groups, minlength=len(questions))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(questions), size=(n, len(questions)))
    rates = per_q_hits[draws].sum(axis=1) / per_q_rows[draws].sum(axis=1)
    return float(np.quantile(rates, 0.025)), float(np.quantile(rates, 0.975))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bertscore-model", default=None)
    parser.add_argument("--bertscore-layers", type=int, default=None)
    args = parser.parse_args(argv)
    if not SEED_DIR.is_dir():
        print(f"{SEED_DIR} is absent (it comes with ../shared)", file=sys.stderr)
        return 1
    rows = human_rows()
    cols = metric_columns(rows, args.bertscore_model, args.bertscore_layers)
    human = np.array([r["human"] for r in rows])
    fold = folds(rows)
    cv_hits = np.zeros(len(rows), dtype=bool)
    for k in range(FOLDS):
        thresholds, _ = fit(cols, human, np.flatnonzero(fold != k))
        held = np.flatnonzero(fold == k)
        cv_hits[held] = rule(cols, thresholds, held) == human[held]
    final, in_sample = fit(cols, human, np.arange(len(rows)))
    paper = {"rouge_match_f": 0.5, "bert_match_f1": 0.5, "rouge_solo_pr": 0.6, "bert_solo_f1": 0.9}
    paper_hits = rule(cols, paper) == human
    low, high = bootstrap_by_question(cv_hits, rows)
    p_low, p_high = bootstrap_by_question(paper_hits, rows)
    print(json.dumps({
        "backbone": cols["info"]["model"], "rows": len(rows), "questions": len({r["question"] for r in rows}),
        "human_correct": int(human.sum()),
        "cross_validated_agreement": round(float(cv_hits.mean()), 4), "cv_interval_95": [round(low, 4), round(high, 4)],
        "paper_thresholds_agreement": round(float(paper_hits.mean()), 4), "paper_interval_95": [round(p_low, 4), round(p_high, 4)],
        "fitted_thresholds": final, "in_sample_agreement": round(in_sample, 4),
        "by_source_in_sample": {s: round(float((rule(cols, final) == human)[[r["source"] == s for r in rows]].mean()), 4)
                                for s in sorted({r["source"] for r in rows})},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
