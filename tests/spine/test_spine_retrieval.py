"""exar.retrieval: documents (txt/md/pdf), passages, the BM25 index, and its bad inputs."""

from __future__ import annotations

import json
import os

import pytest

from exar.errors import ExarError
from exar.retrieval import (add_passages, build_index, chunk_document, load_documents, open_index,
                            retrieve_context, with_passages, word_windows)

pytest.importorskip("bm25s")

HANDBOOK = """# Annual leave
Full-time staff receive 26 days of paid annual leave and three Tide Days.

# Travel and expenses
Rail travel is booked in standard class. The mileage rate is 41 pence per mile.

# IT security
Passwords must be at least 14 characters long. The helpdesk is called Beacon Desk.
"""


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF whose text layer is ``text`` (Helvetica), with a correct xref table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.fixture
def docs(tmp_path):
    (tmp_path / "handbook.md").write_text(HANDBOOK, encoding="utf-8")
    (tmp_path / "boats.pdf").write_bytes(minimal_pdf("The research vessel is the Marram Tern, a catamaran."))
    return tmp_path


def test_word_windows_overlap_and_cover_every_word():
    words = [str(i) for i in range(250)]
    windows = word_windows(words, 120, 30)
    assert [(w[0], w[-1], len(w)) for w in windows] == [("0", "119", 120), ("90", "209", 120), ("180", "249", 70)]
    assert word_windows(words[:100], 120, 30) == [words[:100]]
    with pytest.raises(ExarError, match="overlap"):
        word_windows(words, 10, 10)


def test_passages_stay_inside_sections_and_carry_the_title(docs):
    doc = load_documents([docs / "handbook.md"])[0]
    passages = chunk_document(doc, words=8, overlap=2)
    assert [p.id for p in passages][:3] == ["handbook.md#1", "handbook.md#2", "handbook.md#3"]
    assert passages[0].text == "Annual leave. Full-time staff receive 26 days of paid annual"
    assert passages[1].text == "Annual leave. paid annual leave and three Tide Days."
    assert {p.section for p in passages} == {"Annual leave", "Travel and expenses", "IT security"}


def test_pdf_text_is_read_through_pypdf(docs):
    pytest.importorskip("pypdf")
    (pdf,) = load_documents([docs / "boats.pdf"])
    assert pdf.name == "boats.pdf" and "Marram Tern, a catamaran" in pdf.text


def test_index_finds_the_passage_and_records_hashes(docs, tmp_path):
    built = build_index([docs], tmp_path / "idx", words=40, overlap=10)
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert [d["name"] for d in meta["documents"]] == ["boats.pdf", "handbook.md"]
    assert meta["passages"] == len(built.passages) == 4
    index = open_index(tmp_path / "idx")
    assert [h.passage.id for h in index.search("How many tide days do staff get?", 1)] == ["handbook.md#1"]
    assert index.search("What is the mileage rate per mile?", 5)[0].passage.id == "handbook.md#2"
    assert index.search("Which catamaran is the research vessel?", 1)[0].passage.id == "boats.pdf#1"
    assert index.stale() == []
    context, hits = retrieve_context(index, "How long must passwords be?", "Given.", k=1)
    assert hits[0]["id"] == "handbook.md#3"
    assert context == "Given.\n\nIT security. Passwords must be at least 14 characters long. The helpdesk is called Beacon Desk."


def test_a_changed_or_removed_document_is_reported(docs, tmp_path):
    build_index([docs], tmp_path / "idx")
    (docs / "handbook.md").write_text(HANDBOOK + "\nNew rule.\n", encoding="utf-8")
    (docs / "boats.pdf").unlink()
    stale = open_index(tmp_path / "idx").stale()
    assert len(stale) == 2
    assert "boats.pdf: indexed in" in stale[0] and "no longer there" in stale[0]
    assert "handbook.md: changed since it was indexed" in stale[1]


def test_with_passages_adds_retrieved_context_to_qa_records(docs, tmp_path):
    from exar.data import QA

    index = build_index([docs / "handbook.md"], tmp_path / "idx")
    (record,) = with_passages([QA("What is the helpdesk called?", "Beacon Desk", source="q.jsonl:1")], index, k=1)
    assert record.context == index.passages[2].text and index.passages[2].id == "handbook.md#3"
    with pytest.raises(ExarError, match=r"q.jsonl:2: no passage in .* matches the question 'Zebra\?'"):
        with_passages([QA("Zebra?", "x", source="q.jsonl:2")], index)
    assert add_passages("A", []) == "A"


@pytest.mark.parametrize("name, content, message", [
    ("broken.pdf", b"%PDF-1.4\nthis is not a pdf", "broken.pdf: not a readable PDF"),
    ("empty.md", b"  \n\n", "empty.md: empty document"),
    ("notes.docx", b"x", "unsupported document type .docx"),
    ("latin.txt", b"caf\xe9", "latin.txt: not UTF-8 text"),
])
def test_bad_documents_are_one_line_errors_and_write_no_index(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ExarError, match=message) as error:
        build_index([tmp_path / name], tmp_path / "idx")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "idx").exists() and not any("exar-tmp" in p for p in os.listdir(tmp_path))


def test_not_an_index_is_a_clear_error(tmp_path):
    with pytest.raises(ExarError, match="not an exar index"):
        open_index(tmp_path)
