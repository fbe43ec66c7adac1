"""Your own documents: loading, chunking into passages, and a BM25 index over them (no torch).

Shared by the train stage (``exar-train pretrain``/``generate-qa`` read documents through
``load_documents``; ``exar-train all --retrieve`` puts passages into the training rows) and the
edge (``exar-edge index``, ``--docs`` on ask/batch/chat) and eval (``exar-eval compare --docs``),
so a passage means the same text everywhere.

An index is a folder::

    INDEX/
      index.json        format, chunking, retriever settings, and every document's path + sha256
      passages.jsonl    {"id": "handbook.md#3", "doc": "handbook.md", "section": ..., "text": ...}
      bm25/             the bm25s index (sparse matrices + vocabulary)

It is written under a temporary name and renamed when complete. Opening it checks each document's
hash, so a document changed (or gone) since indexing is reported (``Index.stale``).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from exar.constants import PASSAGE_OVERLAP, PASSAGE_WORDS, TOP_K
from exar.errors import ExarError
from exar.rundir import atomic_path, now, read_json

SUFFIXES = (".txt", ".md", ".pdf")
INDEX_FORMAT = "exar-index"
INDEX_VERSION = 1
INDEX_FILE = "index.json"
PASSAGES_FILE = "passages.jsonl"
BM25_DIR = "bm25"
STEMMER = "english"       # Snowball stemmer of PyStemmer, used when installed
PASSAGE_SEPARATOR = "\n\n"

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class Document:
    """One text file as read: where it is, what it says, and the hash of its bytes."""

    path: str
    name: str
    text: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Passage:
    """A retrievable piece of a document; ``id`` is ``<document name>#<number from 1>``."""

    id: str
    doc: str
    section: str
    text: str


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float

    def to_dict(self) -> dict:
        return {"id": self.passage.id, "score": round(self.score, 4)}


# --- documents ----------------------------------------------------------------------------------

def document_paths(paths: Iterable[Path | str]) -> list[Path]:
    """Files named (or found under named folders) with a supported suffix, in a stable order."""
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not inside:
                raise ExarError(f"{path}: no {'/'.join(SUFFIXES)} documents in this folder")
            found += inside
        elif not path.is_file():
            raise ExarError(f"{path}: no such document")
        elif path.suffix.lower() not in SUFFIXES:
            raise ExarError(f"{path}: unsupported document type {path.suffix or '(none)'}; "
                            f"exar reads {', '.join(SUFFIXES)}")
        else:
            found.append(path)
    if not found:
        raise ExarError("no documents given")
    return list(dict.fromkeys(p.resolve() for p in found))


def load_documents(paths: Iterable[Path | str]) -> list[Document]:
    """Read every document; an unreadable PDF or an empty document is an error naming the file.

    Names are the file names, or the paths as given when two files share a name.
    """
    files = document_paths(paths)
    names = [p.name for p in files]
    unique = len(set(names)) == len(names)
    documents = []
    for path in files:
        raw = path.read_bytes()
        text = _pdf_text(path) if path.suffix.lower() == ".pdf" else _plain_text(path, raw)
        if not text.strip():
            raise ExarError(f"{path}: empty document (no text)"
                            + (" — a scanned PDF needs OCR first" if path.suffix.lower() == ".pdf" else ""))
        documents.append(Document(str(path), path.name if unique else str(path), text,
                                  hashlib.sha256(raw).hexdigest(), len(raw)))
    return documents


def _plain_text(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ExarError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _pdf_text(path: Path) -> str:
    """The text layer of a PDF through pypdf, pages joined by blank lines."""
    try:
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError
    except ImportError:
        raise ExarError(f"{path}: reading PDF needs pypdf: pip install pypdf") from None
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            raise ExarError(f"{path}: the PDF is encrypted; decrypt it first")
        return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages)
    except ExarError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as e:
        raise ExarError(f"{path}: not a readable PDF ({type(e).__name__}: {e})") from None


# --- chunking ----------------------------------------------------------------------------------

def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) pairs: a Markdown heading opens a section; text before any heading has none."""
    out: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines():
        match = _HEADING.match(line)
        if match:
            out.append((match.group(1).strip(), []))
        else:
            out[-1][1].append(line)
    return [(title, "\n".join(body).strip()) for title, body in out if "\n".join(body).strip()]


def word_windows(words: Sequence[str], size: int, overlap: int) -> list[list[str]]:
    """Windows of ``size`` words, each sharing ``overlap`` words with the one before; the last may be shorter."""
    if size < 1 or not 0 <= overlap < size:
        raise ExarError(f"passage size must be >= 1 and overlap in [0, size), got {size} and {overlap}")
    if not words:
        return []
    step = size - overlap
    windows = [list(words[i:i + size]) for i in range(0, max(len(words) - overlap, 1), step)]
    return windows


def chunk_document(doc: Document, words: int = PASSAGE_WORDS, overlap: int = PASSAGE_OVERLAP) -> list[Passage]:
    """A document's passages: word windows that never cross a section, each headed by its section title.

    The title goes in front of the passage text ("Annual leave. Staff get ..."), so a question
    naming the topic finds it.
    """
    passages = []
    for title, body in sections(doc.text):
        for window in word_windows(body.split(), words, overlap):
            text = " ".join(window)
            number = len(passages) + 1
            passages.append(Passage(f"{doc.name}#{number}", doc.name, title, f"{title}. {text}" if title else text))
    return passages


def chunk_documents(docs: Sequence[Document], words: int = PASSAGE_WORDS,
                    overlap: int = PASSAGE_OVERLAP) -> list[Passage]:
    return [p for doc in docs for p in chunk_document(doc, words, overlap)]


# --- the index ---------------------------------------------------------------------------------

def _tokenize(texts: list[str], stem: bool):
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer() if stem else None, show_progress=False)


def _stemmer():
    try:
        import Stemmer
    except ImportError:
        return None
    return Stemmer.Stemmer(STEMMER).stemWords


@dataclass
class Index:
    """BM25 over passages (bm25s), with the documents it was built from."""

    root: Path
    meta: dict
    passages: list[Passage]
    retriever: object = field(repr=False, default=None)

    @property
    def documents(self) -> list[dict]:
        return self.meta["documents"]

    def stale(self) -> list[str]:
        """One line per document that changed or disappeared since the index was built."""
        lines = []
        for doc in self.documents:
            path = Path(doc["path"])
            if not path.is_file():
                lines.append(f"{path}: indexed in {self.root} but no longer there")
            elif hashlib.sha256(path.read_bytes()).hexdigest() != doc["sha256"]:
                lines.append(f"{path}: changed since it was indexed in {self.root}; "
                             "rebuild with `exar-edge index`")
        return lines

    def search(self, query: str, k: int = TOP_K) -> list[Hit]:
        """The ``k`` best passages for ``query`` that share at least one (stemmed, non-stop) word with it."""
        if k < 1:
            raise ExarError(f"the number of passages must be >= 1, got {k}")
        tokens = _tokenize([query], self.meta["retriever"]["stem"] and _stemmer() is not None)
        if not tokens.ids[0]:
            return []
        k = min(k, len(self.passages))
        ids, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [Hit(self.passages[int(i)], float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]


def build_index(paths: Iterable[Path | str], out: Path | str, *, words: int = PASSAGE_WORDS,
                overlap: int = PASSAGE_OVERLAP, stem: bool = True) -> Index:
    """Read, chunk and index ``paths`` into the folder ``out`` (replaced atomically when complete)."""
    import bm25s

    docs = load_documents(paths)
    passages = chunk_documents(docs, words, overlap)
    stem = stem and _stemmer() is not None
    retriever = bm25s.BM25()
    retriever.index(_tokenize([p.text for p in passages], stem), show_progress=False)
    meta = {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "created": now(),
        "chunking": {"words": words, "overlap": overlap, "unit": "whitespace words, within a section"},
        "retriever": {"kind": "bm25", "library": "bm25s", "version": bm25s.__version__,
                      "k1": retriever.k1, "b": retriever.b, "method": retriever.method,
                      "stopwords": "en", "stem": stem, "stemmer": STEMMER if stem else None},
        "documents": [{"path": d.path, "name": d.name, "sha256": d.sha256, "bytes": d.bytes,
                       "passages": sum(p.doc == d.name for p in passages)} for d in docs],
        "passages": len(passages),
    }
    out = Path(out)
    with atomic_path(out, is_dir=True) as tmp:
        retriever.save(str(tmp / BM25_DIR), show_progress=False)
        with open(tmp / PASSAGES_FILE, "w", encoding="utf-8") as f:
            for p in passages:
                f.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")
        (tmp / INDEX_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Index(out, meta, passages, retriever)


def open_index(path: Path | str, *, warn: bool = False) -> Index:
    """An index folder written by ``build_index``; anything else is a one-line error.

    ``warn`` prints a warning line on stderr for each document changed since indexing (``Index.stale``).
    """
    import bm25s

    root = Path(path)
    meta_path = root / INDEX_FILE
    if not meta_path.is_file():
        raise ExarError(f"{root}: not an exar index (no {INDEX_FILE}); build one with `exar-edge index DOCS -o {root}`")
    meta = read_json(meta_path)
    if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
        raise ExarError(f"{meta_path}: index format {meta.get('format')} v{meta.get('version')} is not "
                        f"{INDEX_FORMAT} v{INDEX_VERSION}; rebuild it with `exar-edge index`")
    try:
        passages = [Passage(**json.loads(line)) for line in
                    (root / PASSAGES_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
        retriever = bm25s.BM25.load(str(root / BM25_DIR), show_progress=False, verbosity=0)
    except (OSError, ValueError, TypeError) as e:
        raise ExarError(f"{root}: damaged index ({type(e).__name__}: {e}); rebuild it with `exar-edge index`") from None
    if len(passages) != meta.get("passages"):
        raise ExarError(f"{root}: damaged index ({len(passages)} passages, {meta.get('passages')} recorded)")
    index = Index(root, meta, passages, retriever)
    for line in index.stale() if warn else ():
        print(f"warning: {line}", file=sys.stderr)
    return index


# --- passages into the Context slot (edge --docs, train --retrieve, eval --docs) -----------------

def add_passages(context: str, hits: Sequence[Hit]) -> str:
    """``context`` (if any) and then each retrieved passage it does not already hold."""
    texts = [h.passage.text for h in hits if h.passage.text not in context]
    return PASSAGE_SEPARATOR.join(([context] if context else []) + texts)


def retrieve_context(index: Index, question: str, context: str = "", k: int = TOP_K) -> tuple[str, list[dict]]:
    """The Context slot for ``question`` (its own context, then the top-``k`` passages) and the
    passages' ``{"id", "score"}``; a question no passage matches is an error naming it."""
    hits = index.search(question, k)
    if not hits:
        raise ExarError(f"no passage in {index.root} matches the question {_short(question)!r}; "
                        "rephrase it with words the documents use")
    return add_passages(context, hits), [h.to_dict() for h in hits]


def with_passages(records: Sequence, index: Index, k: int = TOP_K) -> list:
    """Copies of QA records with the top-``k`` passages added to their context (``retrieve_context``)."""
    from dataclasses import replace

    out = []
    for record in records:
        try:
            context, _ = retrieve_context(index, record.question, record.context, k)
        except ExarError as e:
            raise ExarError(f"{record.source}: {e}" if getattr(record, "source", "") else str(e)) from None
        out.append(replace(record, context=context))
    return out


def questions_with_passages(records: Sequence, index: Index, k: int, out: Path | str) -> Path:
    """``with_passages`` written as a question JSONL (``exar.data.QA`` fields) at ``out``, atomically."""
    from exar.data import write_jsonl

    return write_jsonl(out, (r.to_dict() for r in with_passages(records, index, k)))


def retrieved_splits(index_path: Path | str | None, k: int, *splits: Sequence) -> tuple[list, dict | None]:
    """``exar-train --retrieve``: each split's records with their passages added, and what run.json
    records about the index (None, and the splits unchanged, without an index)."""
    if index_path is None:
        return list(splits), None
    index = open_index(index_path, warn=True)
    return [with_passages(split, index, k) for split in splits], index_facts(index, k)


def index_facts(index: Index, k: int) -> dict:
    """What run.json / a report records about retrieval: which index, over which documents, how many passages."""
    return {"index": str(Path(index.root).resolve()), "k": k, "passages": len(index.passages),
            "retriever": index.meta["retriever"]["kind"],
            "documents": {d["name"]: d["sha256"] for d in index.documents}}


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
