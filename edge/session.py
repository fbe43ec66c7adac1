"""Asking an exported run questions: one at a time, a resumable file of them, or a chat.

The functions behind ``exar-edge ask | batch | chat``, callable from Python alike. A session is a
llama.cpp runtime plus the loop's settings; every answer it gives is ``Result.to_dict()`` plus
how it ran (mode, quant, threads, peak RSS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from exar.constants import TOP_K
from exar.data import append_jsonl, question_key, read_jsonl_resumable
from exar.edge.loop import LoopSettings, run_loop
from exar.edge.runtime import LlamaRuntime, open_runtime
from exar.resources import peak_rss_mb
from exar.errors import ExarError
from exar.rundir import Run


@dataclass
class Session:
    runtime: LlamaRuntime
    settings: LoopSettings
    docs: object = None    # an exar.retrieval.Index: its top passages go into the Context slot (--docs)
    top_k: int = TOP_K

    def ask(self, question: str, context: str = "") -> dict:
        """The loop's answer to one question, with the runtime facts a laptop user wants to see."""
        check_text(question, "the question")
        passages = None
        if self.docs is not None:
            from exar.retrieval import retrieve_context

            context, passages = retrieve_context(self.docs, question, context, self.top_k)
        result = run_loop(self.runtime, question, context=context, settings=self.settings).to_dict()
        if passages is not None:
            result["passages"] = passages
        models = self.runtime.models
        result.update(mode=models.mode, quant=models.quant, threads=self.runtime.threads,
                      peak_rss_mb=round(peak_rss_mb(), 1))
        return result

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_session(run: Run, *, mode: str | None = None, quant: str | None = None, threads: int | None = None,
                 n_ctx: int | None = None, verbose: bool = False, docs=None, top_k: int = TOP_K,
                 **loop_overrides) -> Session:
    """A session on ``run``'s GGUFs; loop settings from the run (threshold) unless overridden (None = keep).

    ``docs`` (an ``exar.retrieval.Index``) puts each question's top ``top_k`` passages in its context.
    """
    settings = LoopSettings.for_run(run.settings, **loop_overrides)
    runtime_options = {"n_ctx": n_ctx} if n_ctx is not None else {}
    return Session(open_runtime(run, mode=mode, quant=quant, threads=threads, verbose=verbose, **runtime_options),
                   settings, docs, top_k)


def check_text(text, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ExarError(f"{what} is empty" if isinstance(text, str) or text is None else f"{what} must be text")
    return text


def read_questions(path: Path | str) -> list[dict]:
    """Rows ``{"question", "context"?, "id"?}`` of a JSONL file, checked line by line before any model loads."""
    from exar.data import read_jsonl

    path = Path(path)
    parsed = read_jsonl(path)  # names the file and line of invalid JSON
    numbers = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    rows = []
    for number, row in zip(numbers, parsed):
        where = f"{path}:{number}"
        if not isinstance(row, dict):
            raise ExarError(f"{where}: expected a JSON object with a 'question'")
        check_text(row.get("question"), f"{where}: field 'question'")
        if not isinstance(row.get("context", ""), str):
            raise ExarError(f"{where}: field 'context' must be a string")
        rows.append(row)
    if not rows:
        raise ExarError(f"{path}: no questions")
    return rows


def row_key(row: dict) -> str:
    """What identifies a question across an interrupted and a resumed batch: its id, else its text."""
    return f"id:{row['id']}" if row.get("id") is not None else f"q:{question_key(row['question'])}"


def pending_questions(rows: list[dict], out_path: Path | str) -> tuple[list[dict], int]:
    """The rows not yet answered in ``out_path`` (a cut-short last line is dropped), and how many are."""
    done = {row_key(row) for row in read_jsonl_resumable(out_path) if isinstance(row, dict) and "question" in row}
    pending = [row for row in rows if row_key(row) not in done]
    return pending, len(rows) - len(pending)


def answer_batch(session: Session, rows: list[dict], out_path: Path | str, *, progress: bool = True) -> Iterator[dict]:
    """Answer the rows not yet in ``out_path``, appending each answer as soon as it is made (resumable)."""
    from exar.progress import bar

    pending, done = pending_questions(rows, out_path)
    if session.docs is not None:  # a question no passage matches stops the batch before any answer
        from exar.retrieval import retrieve_context

        for row in pending:
            retrieve_context(session.docs, row["question"], k=session.top_k)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    steps = bar(pending, desc="answering", total=len(rows), initial=done, unit="q") if progress else pending
    for row in steps:
        answer = session.ask(row["question"], row.get("context") or "")
        if row.get("id") is not None:
            answer = {"id": row["id"], **answer}
        append_jsonl(out_path, answer)
        yield answer
