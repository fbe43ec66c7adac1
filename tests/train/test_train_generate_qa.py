"""exar-train generate-qa: parsing and filtering on fixed model outputs, and the real CLI on the tiny Llama."""

from __future__ import annotations

import json

import pytest

from exar.data import load_qa, read_jsonl, write_jsonl
from exar.retrieval import Passage
from exar.train.cli import main
from exar.train.generate_qa import filter_pairs, parse_pairs, support

PASSAGE = Passage("policy.md#1", "policy.md", "Annual leave",
                  "Annual leave. Full-time staff receive 26 days of paid annual leave and three Tide Days. "
                  "Leave must be requested in StaffDesk at least 10 working days before it starts.")


def exar_train(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_parse_pairs_reads_the_usual_shapes():
    text = ("Here are three questions:\n"
            "Q: How many days of annual leave do staff get?\nA: 26 days\n\n"
            "**Question 2:** Where is leave requested?\n**Answer:** In StaffDesk\n"
            "3. Q) How many Tide Days are there? A: three\n"
            "Q: A question never answered?\n"
            "Q: What must be requested?\nAnswer: \"Leave\"\nand more text the answer does not take\n"
            "A: an answer with no question\n")
    assert parse_pairs(text) == [
        ("How many days of annual leave do staff get?", "26 days"),
        ("Where is leave requested?", "In StaffDesk"),
        ("How many Tide Days are there?", "three"),
        ("What must be requested?", "Leave"),
    ]
    assert parse_pairs("The model wrote prose only.") == []


def test_support_is_rouge_l_recall_of_the_answer_against_the_passage():
    assert support("26 days", PASSAGE.text) == 1.0
    assert support("paid sick days", PASSAGE.text) == pytest.approx(2 / 3)  # "paid ... days": 2 of 3 words
    assert support("thirty weeks", PASSAGE.text) == 0.0


def test_filters_count_what_they_remove_and_keep_the_passage_as_context():
    outputs = [(PASSAGE, "Q: How many days of annual leave do staff get?\nA: 26 days\n"
                         "Q: How many sick days are paid?\nA: paid sick days\n"
                         "Q: What is StaffDesk used for?\nA: StaffDesk\n"
                         "Q: how many days of annual leave do staff get\nA: 26\n"
                         "Q: How much notice is needed?\nA: " + "at least ten " * 11 + "\n"),
               (PASSAGE, "Q: How many working days ahead is leave requested?\nA: at least 10 working days\n")]
    result = filter_pairs(outputs, min_support=0.7, max_answer_words=30)
    assert result.counts == {"parsed": 6, "too_long": 1, "answer_in_question": 1, "unsupported": 1,
                             "duplicate": 1, "kept": 2}
    assert result.rows == [
        {"question": "How many days of annual leave do staff get?", "answer": "26 days", "context": PASSAGE.text,
         "category": "generated", "passage": "policy.md#1", "support": 1.0},
        {"question": "How many working days ahead is leave requested?", "answer": "at least 10 working days",
         "context": PASSAGE.text, "category": "generated", "passage": "policy.md#1", "support": 1.0},
    ]
    assert filter_pairs(outputs, min_support=0.6).counts["kept"] == 3  # "paid sick days" (0.667) passes at 0.6


def test_cli_on_the_tiny_model_resumes_and_reuses_raw_outputs(tiny_llama, tmp_path, capsys):
    doc = tmp_path / "policy.md"
    doc.write_text("# Annual leave\nFull-time staff receive 26 days of paid annual leave and three Tide Days.\n\n"
                   "# Travel\nRail travel is booked in standard class. The mileage rate is 41 pence per mile.\n")
    out = tmp_path / "qa.jsonl"
    argv = ["generate-qa", "--docs", doc, "-o", out, "--model", tiny_llama, "--max-new-tokens", "6",
            "--batch-size", "1", "--layout", "plain"]
    code, _, err = exar_train(capsys, *argv)
    # a random tiny model writes no Q:/A: lines: a clear error, no output file, its raw outputs kept
    assert code == 1 and "error: no QA pair passed the filters (parsed 0," in err
    assert not out.exists()
    partial = tmp_path / "qa.jsonl.partial.jsonl"
    raw = read_jsonl(partial)
    assert [r["passage"] for r in raw] == ["policy.md#1", "policy.md#2"]

    fixed = ["Q: How many Tide Days do staff get?\nA: three Tide Days\n",
             "Q: In which class is rail travel booked?\nA: standard class\nQ: What is the mileage rate?\nA: 90p\n"]
    write_jsonl(partial, [{**r, "raw": text} for r, text in zip(raw, fixed)])
    code, stdout, err = exar_train(capsys, *argv, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["counts"] == {"parsed": 3, "too_long": 0, "answer_in_question": 0, "unsupported": 1,
                                 "duplicate": 0, "kept": 2}
    assert not partial.exists()
    assert [(r["question"], r["answer"], r["passage"]) for r in read_jsonl(out)] == [
        ("How many Tide Days do staff get?", "three Tide Days", "policy.md#1"),
        ("In which class is rail travel booked?", "standard class", "policy.md#2")]
    records = load_qa(out).records  # what exar-train all --data reads
    assert records[1].context == "Travel. Rail travel is booked in standard class. The mileage rate is 41 pence per mile."
