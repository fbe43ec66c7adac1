"""Data loading, filters and the leak-free split, on fixtures and on ../shared."""

import json

import pytest

from exar.data import (
    QA, filter_qa, load_qa, question_key, read_jsonl, read_jsonl_resumable, split_qa, write_jsonl,
)
from exar.errors import ExarError


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_dolly_jsonl(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"instruction": "Who wrote Hamlet?", "context": "", "response": "Shakespeare", "category": "open_qa"}),
        "",
        json.dumps({"instruction": "When?", "context": "In 1600.", "response": "1600", "category": "closed_qa"}),
    ])
    loaded = load_qa(path)
    assert loaded.format == "dolly" and loaded.skipped == 0
    assert loaded.records[0] == QA("Who wrote Hamlet?", "Shakespeare", "", "open_qa", [], f"{path}:1")
    assert loaded.records[1].context == "In 1600." and loaded.records[1].source == f"{path}:3"


def test_alpaca_json(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"}]))
    loaded = load_qa(path)
    assert loaded.format == "alpaca"
    assert (loaded.records[0].question, loaded.records[0].context, loaded.records[0].answer) == ("Add", "2 and 3", "5")


def test_generic_jsonl_with_field_options_and_aliases(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [json.dumps({"q": "Symbol of gold?", "a": "Au", "aliases": ["AU"]})])
    record = load_qa(path, question_field="q", answer_field="a").records[0]
    assert (record.question, record.answer, record.references) == ("Symbol of gold?", "Au", ["Au", "AU"])


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "q", "context": ""}', r"d\.jsonl:2: missing field 'response'"),
    ('{"instruction": "q", "response": ""}', r"d\.jsonl:2: field 'response' must be a non-empty string"),
    ('{"instruction": "q", "response": 5}', r"d\.jsonl:2: field 'response' must be a non-empty string"),
    ('{"instruction": "q", "response": "a", "context": 3}', r"d\.jsonl:2: field 'context' must be a string"),
    ('{"instruction": "q", "respo', r"d\.jsonl:2: not valid JSON"),
    ('["a list"]', r"d\.jsonl:2: expected a JSON object"),
])
def test_bad_record_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"instruction": "Who?", "response": "Me", "category": "open_qa"})
    path = write_lines(tmp_path / "d.jsonl", [good, line, good])
    with pytest.raises(ExarError, match=message):
        load_qa(path, fmt="dolly")
    loaded = load_qa(path, fmt="dolly", skip_bad=True)
    assert (len(loaded.records), loaded.skipped) == (2, 1)


def test_unreadable_inputs(tmp_path):
    with pytest.raises(ExarError, match="no such data file"):
        load_qa(tmp_path / "missing.jsonl")
    path = write_lines(tmp_path / "x.jsonl", [json.dumps({"foo": 1})])
    with pytest.raises(ExarError, match="cannot tell the format"):
        load_qa(path)
    bad_json = tmp_path / "a.json"
    bad_json.write_text('{"not": "a list"}')
    with pytest.raises(ExarError, match="expected a JSON array"):
        load_qa(bad_json)


def records(*pairs):
    return [QA(q, a, context=c, category=cat) for q, a, c, cat in pairs]


def test_filters():
    data = records(("q1", "short", "", "open_qa"), ("q2", "a much longer answer", "ctx", "closed_qa"),
                   ("q3", "mid", "ctx", "open_qa"))
    assert [r.question for r in filter_qa(data, categories=["open_qa"])] == ["q1", "q3"]
    assert [r.question for r in filter_qa(data, max_answer_chars=5)] == ["q1", "q3"]
    assert [r.question for r in filter_qa(data, context="without")] == ["q1"]
    assert [r.question for r in filter_qa(data, context="with")] == ["q2", "q3"]
    with pytest.raises(ExarError, match="no records left after filtering 3"):
        filter_qa(data, categories=["brainstorming"])


def test_split_groups_duplicates_and_is_deterministic():
    data = [QA(f"Question number {i}?", str(i)) for i in range(200)]
    data += [QA("question NUMBER 7", "again"), QA("Question number 7.", "third")]  # duplicates of #7
    train, test = split_qa(data, test_fraction=0.1, seed=3)
    assert len({question_key(r.question) for r in test}) == 20
    assert not {question_key(r.question) for r in train} & {question_key(r.question) for r in test}
    sevens = [r for r in train + test if question_key(r.question) == "question number 7"]
    assert len(sevens) == 3 and len({r in test for r in sevens}) == 1
    # the same split whatever the file order; another seed gives another split
    train2, test2 = split_qa(list(reversed(data)), test_fraction=0.1, seed=3)
    assert sorted(r.question for r in test2) == sorted(r.question for r in test)
    _, test3 = split_qa(data, test_fraction=0.1, seed=4)
    assert sorted(r.question for r in test3) != sorted(r.question for r in test)


def test_jsonl_round_trip_and_resume(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}, {"a": "é"}])
    assert read_jsonl(path) == [{"a": 1}, {"a": "é"}]
    with open(path, "a") as f:
        f.write('{"a": 3, "cut sho')  # a crash mid-append
    assert read_jsonl_resumable(path) == [{"a": 1}, {"a": "é"}]
    assert read_jsonl(path) == [{"a": 1}, {"a": "é"}]  # the partial line was dropped from the file


def test_real_dolly_head(shared_dir):
    loaded = load_qa(shared_dir / "data/dolly/databricks-dolly-15k.head49.jsonl")
    assert loaded.format == "dolly" and len(loaded.records) == 49
    open_qa = filter_qa(loaded.records, categories=["open_qa"], max_answer_chars=100)
    assert len(open_qa) == 10
    train, test = split_qa(loaded.records, test_fraction=0.2, seed=42)
    assert len(train) + len(test) == 49 and len(test) == 10


def test_real_alpaca_sample(shared_dir):
    path = shared_dir / "data/alpaca/alpaca_data.sample5000.json"
    with pytest.raises(ExarError, match=r"item 2335: field 'output' must be a non-empty string"):
        load_qa(path)  # the sample really holds two records with an empty output
    loaded = load_qa(path, skip_bad=True)
    assert loaded.format == "alpaca" and (len(loaded.records), loaded.skipped) == (4998, 2)
    assert sum(bool(r.context) for r in loaded.records) == len(filter_qa(loaded.records, context="with"))


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "")])
def test_an_empty_data_file_says_it_is_empty(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ExarError, match=rf"{name}: the file is empty; expected QA records"):
        load_qa(path)
