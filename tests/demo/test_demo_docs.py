"""The `exar demo --docs` path on the shipped handbook, with the tiny Llama as the base (CI-sized)."""

from __future__ import annotations

import json

import pytest

from exar.demo_docs import FAST, gold_passages, handbook_files, recall_at_k, run_docs_demo

pytest.importorskip("bm25s")


def test_the_shipped_handbook_and_its_questions():
    from exar.data import load_qa, read_jsonl
    from exar.retrieval import load_documents, sections

    handbook, questions = handbook_files()
    (doc,) = load_documents([handbook])
    assert len(doc.text.split()) > 2500
    rows = read_jsonl(questions)
    assert len(rows) >= 100 and len(load_qa(questions).records) == len(rows)
    bodies = {title: body.lower() for title, body in sections(doc.text)}
    for row in rows:  # every answer (or an alias) is in the handbook, in the section the row names
        assert any(form.lower() in bodies[row["section"]] for form in [row["answer"], *row["aliases"]]), row["question"]


@pytest.mark.slow
def test_demo_docs_measures_every_part(tiny_llama, tmp_path, capsys):
    summary = run_docs_demo(fast=True, run_dir=tmp_path / "run", base=tiny_llama)
    out = capsys.readouterr().out
    assert "== exar demo --docs: what was measured ==" in out

    from exar.retrieval import open_index
    from exar.rundir import Run

    run = Run.open(tmp_path / "run")
    for entry in run.artifacts:
        run.verify(entry["path"])
    index = open_index(run.path("docs/index"))
    questions = [json.loads(line) for line in run.path("docs/questions.jsonl").read_text().splitlines()]
    assert len(questions) == FAST.questions == summary["eval"]["questions"]
    assert summary["retrieval"]["recall@1"] == recall_at_k(index, questions)["recall@1"]
    assert gold_passages(index, questions[0]) == {"vellmar_handbook.md#2"}  # "founded in 1987"
    assert 0 < summary["retrieval"]["recall@1"] <= summary["retrieval"]["recall@5"] <= 1
    assert summary["pretrain"]["ppl_before"] > 0 and summary["pretrain"]["ppl_after"] > 0
    with_docs = [json.loads(line) for line in run.path("docs/questions.docs.jsonl").read_text().splitlines()]
    assert all(row["context"] for row in with_docs)
    for key in ("em_squad", "token_f1", "rougeL_f", "bertscore_f"):
        d = summary["eval"][key]["difference"]
        assert d["n"] == FAST.questions and d["low"] <= d["diff"] <= d["high"]
        assert d["diff"] == pytest.approx(summary["eval"][key]["with"] - summary["eval"][key]["without"])
    assert json.loads(run.path("demo-docs.json").read_text())["retrieval"] == summary["retrieval"]
