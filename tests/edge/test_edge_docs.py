"""exar-edge index, and ask / batch / chat --docs: retrieved passages reach the Context slot."""

from __future__ import annotations

import io
import json

import pytest

from exar.data import read_jsonl
from exar.edge.cli import main

pytest.importorskip("bm25s")

FAST = ["--threads", "1", "--max-new-tokens", "4", "--max-rounds", "1"]
POLICY = """# Annual leave
Full-time staff receive 26 days of paid annual leave and three Tide Days each year.

# Travel and expenses
Rail travel is booked in standard class. The mileage rate is 41 pence per mile.

# IT security
Passwords must be at least 14 characters long. The IT helpdesk is called Beacon Desk.
"""


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.fixture
def index(tmp_path, capsys):
    (tmp_path / "policy.md").write_text(POLICY, encoding="utf-8")
    code, out, err = run_cli(capsys, "index", tmp_path / "policy.md", "-o", tmp_path / "idx")
    assert code == 0, err
    assert out.strip() == f"indexed 1 document(s), 3 passages -> {tmp_path / 'idx'}"
    return tmp_path / "idx"


def test_ask_docs_puts_the_retrieved_passages_into_the_context(exported_run, index, capsys):
    code, out, err = run_cli(capsys, "ask", "--run", exported_run.root, "What is the IT helpdesk called?",
                             "--docs", index, "--top-k", "2", "--json", *FAST)
    assert code == 0, err
    result = json.loads(out)
    assert [p["id"] for p in result["passages"]] == ["policy.md#3"]  # no other passage shares a word
    assert result["context"] == ("IT security. Passwords must be at least 14 characters long. "
                                 "The IT helpdesk is called Beacon Desk.")
    code, out, err = run_cli(capsys, "ask", "--run", exported_run.root, "How much is the mileage rate for rail?",
                             "--docs", index, "--top-k", "2", "--context", "Mine.", "--json", *FAST)
    result = json.loads(out)
    assert [p["id"] for p in result["passages"]] == ["policy.md#2"]
    assert result["context"].startswith("Mine.\n\nTravel and expenses. Rail travel")


def test_ask_docs_with_no_matching_passage_is_one_line(exported_run, index, capsys):
    code, out, err = run_cli(capsys, "ask", "--run", exported_run.root, "Who painted the zebra?",
                             "--docs", index, *FAST)
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [f"error: no passage in {index} matches the question 'Who painted the zebra?'; "
                                        "rephrase it with words the documents use"]


def test_changed_document_is_reported(exported_run, index, tmp_path, capsys):
    (tmp_path / "policy.md").write_text(POLICY + "\n# New\nA new rule.\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "ask", "--run", exported_run.root, "How many tide days?", "--docs", index,
                             "--trace", *FAST)
    assert code == 0, err
    assert f"warning: {tmp_path / 'policy.md'}: changed since it was indexed in {index}" in err
    assert "passages: policy.md#1 (" in err


def test_batch_docs_checks_every_question_before_answering(exported_run, index, tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": 1, "question": "How long must passwords be?"}) + "\n"
                         + json.dumps({"id": 2, "question": "Zebra?"}) + "\n")
    out_path = tmp_path / "a.jsonl"
    code, _, err = run_cli(capsys, "batch", "--run", exported_run.root, questions, "-o", out_path, "--docs", index, *FAST)
    assert code == 1 and "no passage in" in err and "'Zebra?'" in err
    assert not out_path.exists()  # nothing answered, nothing written

    questions.write_text(json.dumps({"id": 1, "question": "How long must passwords be?"}) + "\n")
    code, _, err = run_cli(capsys, "batch", "--run", exported_run.root, questions, "-o", out_path, "--docs", index, *FAST)
    assert code == 0, err
    (row,) = read_jsonl(out_path)
    assert row["id"] == 1 and [p["id"] for p in row["passages"]] == ["policy.md#3"]


def test_chat_docs_keeps_going_after_a_question_without_passages(exported_run, index, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Zebra?\n:trace\nHow many tide days?\n:quit\n"))
    code, out, err = run_cli(capsys, "chat", "--run", exported_run.root, "--docs", index, *FAST)
    assert code == 0, err
    assert "error: no passage in" in err and "passages: policy.md#1 (" in err
