"""QA data: dolly-15k JSONL, Alpaca JSON, or any JSONL; filters; a leak-free seeded split.

Every loader returns the same ``QA`` records. A bad record is an error naming the file and line
(or item), or, with ``skip_bad``, is skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from exar.errors import BadRecord, ExarError
from exar.rundir import atomic_path

FORMATS = ("auto", "dolly", "alpaca", "jsonl")
CONTEXT_FILTERS = ("any", "with", "without")

# field names per format: question, answer, context, category
_FIELDS = {
    "dolly": ("instruction", "response", "context", "category"),
    "alpaca": ("instruction", "output", "input", "category"),
    "jsonl": ("question", "answer", "context", "category"),
}


@dataclass
class QA:
    """One question with its reference answer (and accepted aliases)."""

    question: str
    answer: str
    context: str = ""
    category: str = ""
    aliases: list[str] = field(default_factory=list)
    source: str = ""  # "file:line" it came from

    @property
    def references(self) -> list[str]:
        return [self.answer, *self.aliases]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QA":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class Loaded:
    records: list[QA]
    skipped: int
    format: str


def load_qa(
    path: Path | str,
    *,
    fmt: str = "auto",
    question_field: str | None = None,
    answer_field: str | None = None,
    context_field: str | None = None,
    skip_bad: bool = False,
) -> Loaded:
    """Read QA records from ``path``; field options override the format's field names."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ExarError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise ExarError(f"{path}: no such data file")
    items = list(_raw_items(path))
    if fmt == "auto":
        fmt = _guess_format(path, items, question_field)
    q_key, a_key, c_key, cat_key = _FIELDS[fmt]
    q_key, a_key, c_key = question_field or q_key, answer_field or a_key, context_field or c_key

    records, skipped = [], 0
    for where, item in items:
        try:
            records.append(_to_qa(item, where, q_key, a_key, c_key, cat_key))
        except BadRecord:
            if not skip_bad:
                raise
            skipped += 1
    if not records:
        raise ExarError(f"{path}: no usable records ({skipped} bad)" if skipped else f"{path}: no records")
    return Loaded(records, skipped, fmt)


def _raw_items(path: Path) -> Iterable[tuple[str, object]]:
    """(where, parsed item) pairs; unparsable JSONL lines come out as ``_Bad`` so skip_bad can count them."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ExarError(f"{path}: the file is empty; expected QA records (dolly or JSONL lines, or an Alpaca JSON array)")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExarError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise ExarError(f"{path}: expected a JSON array of records")
        for i, item in enumerate(data):
            yield f"{path}: item {i}", item
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{number}", _Bad(f"not valid JSON ({e.msg})")


class _Bad:
    def __init__(self, reason: str):
        self.reason = reason


def _guess_format(path: Path, items: list, question_field: str | None) -> str:
    if path.suffix == ".json":
        return "alpaca"
    first = next((item for _, item in items if isinstance(item, dict)), {})
    if question_field:
        return "jsonl"
    if "instruction" in first and "response" in first:
        return "dolly"
    if "instruction" in first and "output" in first:
        return "alpaca"
    if "question" in first and "answer" in first:
        return "jsonl"
    raise ExarError(
        f"{path}: cannot tell the format from fields {sorted(first)}; "
        "pass --format or --question-field/--answer-field"
    )


def _to_qa(item, where: str, q_key: str, a_key: str, c_key: str, cat_key: str) -> QA:
    if isinstance(item, _Bad):
        raise BadRecord(f"{where}: {item.reason}")
    if not isinstance(item, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {type(item).__name__}")
    for key in (q_key, a_key):
        if key not in item:
            raise BadRecord(f"{where}: missing field {key!r}")
        if not isinstance(item[key], str) or not item[key].strip():
            raise BadRecord(f"{where}: field {key!r} must be a non-empty string")
    context = item.get(c_key) or ""
    if not isinstance(context, str):
        raise BadRecord(f"{where}: field {c_key!r} must be a string")
    aliases = item.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise BadRecord(f"{where}: field 'aliases' must be a list of strings")
    return QA(
        question=item[q_key].strip(),
        answer=item[a_key].strip(),
        context=context.strip(),
        category=str(item.get(cat_key) or ""),
        aliases=[a.strip() for a in aliases if a.strip()],
        source=where,
    )


def filter_qa(
    records: Sequence[QA],
    *,
    categories: Sequence[str] = (),
    max_answer_chars: int | None = None,
    context: str = "any",
) -> list[QA]:
    """Keep the records that pass every filter; an empty result is an error naming the filters."""
    if context not in CONTEXT_FILTERS:
        raise ExarError(f"unknown context filter {context!r}; choose one of {', '.join(CONTEXT_FILTERS)}")
    kept = [
        r for r in records
        if (not categories or r.category in categories)
        and (max_answer_chars is None or len(r.answer) <= max_answer_chars)
        and (context == "any" or (context == "with") == bool(r.context))
    ]
    if not kept:
        raise ExarError(
            f"no records left after filtering {len(records)} (categories={list(categories) or 'any'}, "
            f"max answer chars={max_answer_chars}, context={context})"
        )
    return kept


def question_key(question: str) -> str:
    """Questions that differ only in case, spacing or final punctuation are the same question."""
    return re.sub(r"\s+", " ", question.lower()).strip().rstrip("?.!").strip()


def split_qa(records: Sequence, *, test_fraction: float, seed: int,
             question: Callable[[object], str] = lambda r: r.question) -> tuple[list, list]:
    """Deterministic train/test split by question: duplicates of a question stay on one side.

    ``question`` reads the question of a record (QA records by default; dict rows with
    ``lambda row: row["question"]``).

    Groups are ordered by a seeded hash of their question, so the split depends neither on file
    order nor on the machine; the first round(fraction x groups) groups are the test side.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ExarError(f"test fraction must be in [0, 1), got {test_fraction}")
    groups: dict[str, list[QA]] = {}
    for record in records:
        groups.setdefault(question_key(question(record)), []).append(record)
    ranked = sorted(groups, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest())
    n_test = round(test_fraction * len(ranked))
    if test_fraction > 0 and n_test == 0 and len(ranked) > 1:
        n_test = 1
    test_keys = set(ranked[:n_test])
    train = [r for r in records if question_key(question(r)) not in test_keys]
    test = [r for r in records if question_key(question(r)) in test_keys]
    return train, test


def write_jsonl(path: Path | str, rows: Iterable[dict]) -> Path:
    """Write rows as JSONL atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def read_jsonl(path: Path | str) -> list[dict]:
    """Rows of a JSONL file exar wrote (or a user gave), with line-numbered errors."""
    path = Path(path)
    if not path.is_file():
        raise ExarError(f"{path}: no such file")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ExarError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    return rows


def append_jsonl(path: Path | str, row: dict) -> None:
    """Append one row and flush: resumable outputs (predict, batch) grow a line at a time."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()


def read_jsonl_resumable(path: Path | str) -> list[dict]:
    """Rows of an append-only file; a last line cut short by a crash is dropped from the file."""
    path = Path(path)
    if not path.is_file():
        return []
    rows, lines = [], path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise ExarError(f"{path}:{number}: not valid JSON") from None
            write_jsonl(path, rows)
    return rows
