"""exar demo --docs: your own documents, on the handbook that ships with exar, CPU only.

The Vellmar Institute's staff handbook (``exar/demo_data/handbook/``, a fictional organisation's
policies written for exar) and its questions, answerable only from it, through every documents
path exar has:

1. ``index``: the BM25 index over the handbook's passages (what ``exar-edge index`` writes);
2. ``retrieval``: recall@1/@5 of that index over the questions;
3. ``pretrain``: domain pre-training of a LoRA on the handbook's text, perplexity on held-out
   chunks before and after (``exar-train pretrain``);
4. ``eval``: the built-in base model answers the questions (every 4th: 36 of the 142, a CPU-sized
   sample across all sections) without and with the top passages in
   its context (``exar-eval compare --variants base [--docs]``), with paired-bootstrap intervals.

Like ``exar demo``, each stage skips what the run already holds, so a rerun resumes.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from exar import constants as C
from exar.rundir import Run, atomic_write_json, models_dir

BASE = "smollm2-135m-instruct"
INDEX = "docs/index"
QUESTIONS = "docs/questions.jsonl"
QUESTIONS_WITH_DOCS = "docs/questions.docs.jsonl"
SUMMARY = "demo-docs.json"
TIMINGS = "demo-docs-timings.json"
METRICS = (("em_squad", "exact match"), ("token_f1", "token F1"), ("rougeL_f", "ROUGE-L F"),
           ("bertscore_f", "BERTScore F1"))
RECALL_AT = (1, 5)


@dataclass(frozen=True)
class DocsPlan:
    run_name: str
    questions: int | None      # None: all of them
    pretrain_steps: int
    max_new_tokens: int
    held_out: float = 0.2      # share of the handbook's chunks kept out for perplexity
    chunk_tokens: int = 240
    eval_every: int = 1        # the base model answers every n-th question (all are retrieved)


FULL = DocsPlan("demo-docs", questions=None, pretrain_steps=20, max_new_tokens=16, eval_every=4)
FAST = DocsPlan("demo-docs-fast", questions=8, pretrain_steps=2, max_new_tokens=12)


def handbook_files() -> tuple[Path, Path]:
    """(the handbook, its questions) as shipped inside exar (see exar/demo_data/handbook/README.md)."""
    folder = importlib.resources.files("exar.demo_data") / "handbook"
    return Path(str(folder / "vellmar_handbook.md")), Path(str(folder / "vellmar_qa.jsonl"))


def gold_passages(index, record: dict) -> set[str]:
    """The passages that answer a handbook question: those of its section that hold the answer (or
    an alias) as whole words; all of the section's passages when none does."""
    section = [p for p in index.passages if p.section == record["section"]]
    forms = [record["answer"], *record.get("aliases", [])]
    holding = {p.id for p in section
               if any(re.search(rf"(?<!\w){re.escape(f.lower())}(?!\w)", p.text.lower()) for f in forms)}
    return holding or {p.id for p in section}


def recall_at_k(index, records: Sequence[dict], ks: Sequence[int] = RECALL_AT) -> dict:
    """Share of questions with a gold passage among the top k retrieved, for each k."""
    ranked = [[h.passage.id for h in index.search(r["question"], max(ks))] for r in records]
    gold = [gold_passages(index, r) for r in records]
    return {f"recall@{k}": sum(bool(g & set(ids[:k])) for g, ids in zip(gold, ranked)) / len(records) for k in ks}


def run_docs_demo(fast: bool = False, run_dir: str | Path | None = None, base: str | Path = BASE) -> dict:
    """Run the documents path on the shipped handbook; returns (and prints) the summary.

    ``base`` is the built-in SmolLM2 unless a test passes a tiny model."""
    from exar.data import read_jsonl, write_jsonl
    from exar.demo import say, stage

    plan = FAST if fast else FULL
    run = Run.open_or_create(Path(run_dir) if run_dir else models_dir() / plan.run_name)
    timings_path = run.path(TIMINGS)
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    handbook, questions_file = handbook_files()
    records = read_jsonl(questions_file)[:plan.questions]
    say(f"exar demo --docs{' --fast' if fast else ''}: {base}, {handbook.name}, {len(records)} questions, {run.root}")

    with stage("index", timings, timings_path):
        index = _index(run, handbook)
    with stage("retrieval", timings, timings_path):
        recall = recall_at_k(index, records)
    with stage("pretrain", timings, timings_path):
        pretrained = _pretrain(run, handbook, plan, base)
    with stage("eval", timings, timings_path):
        write_jsonl(run.path(QUESTIONS), records[::plan.eval_every])
        evaluation = _with_and_without(run, index, plan)
    summary = {
        "run": str(run.root), "timings_s": timings, "documents": index.meta["documents"],
        "passages": len(index.passages), "retriever": index.meta["retriever"],
        "retrieval": {"questions": len(records), **recall,
                      "gold": "passages of the question's section holding its answer (or an alias) as whole words"},
        "pretrain": pretrained, "eval": evaluation,
    }
    atomic_write_json(run.path(SUMMARY), summary)
    print_summary(summary)
    return summary


def _index(run: Run, handbook: Path):
    from exar.retrieval import build_index, open_index

    if run.has(INDEX):
        index = open_index(run.path(INDEX))
        if not index.stale():
            return index
    index = build_index([handbook], run.path(INDEX))
    run.record(INDEX, "docs-index")
    return index


def _pretrain(run: Run, handbook: Path, plan: DocsPlan, base: str | Path) -> dict:
    from exar.train.pretrain import SECTION, pretrain
    from exar.train.settings import TrainSettings

    settings = TrainSettings(bits=4, batch_size=4, grad_accum=1, max_seq_len=256, lr=5e-4, save_steps=20,
                             max_steps=plan.pretrain_steps, gradient_checkpointing=False)
    pretrain(base, [handbook], settings, run_dir=run.root, chunk_tokens=plan.chunk_tokens, held_out=plan.held_out)
    section = run.settings[SECTION]
    return {k: section.get(k) for k in ("ppl_before", "ppl_after", "held_out_tokens", "steps", "chunks", "bits")}


def _with_and_without(run: Run, index, plan: DocsPlan) -> dict:
    """The base model on the questions without, then with, the top passages; paired differences per question."""
    from exar.basemodel import prompt_style
    from exar.eval.bootstrap import paired_bootstrap
    from exar.eval.compare import CompareSettings, compare, load_questions
    from exar.retrieval import questions_with_passages

    if "prompt" not in run.settings:  # the untrained instruct model answers best in its own chat template
        run.update_settings("prompt", prompt_style(run.settings["base"]["path"], "chat").to_dict())
    questions, _ = load_questions(run, run.path(QUESTIONS), None)
    questions_with_passages(questions, index, C.TOP_K, run.path(QUESTIONS_WITH_DOCS))
    settings = CompareSettings(what="answer")
    loop = {"max_new_tokens": plan.max_new_tokens}
    reports = {name: compare(run, ["base"], test=run.path(rel), name=f"docs-{name}", settings=settings,
                             loop_overrides=loop)
               for name, rel in (("without", QUESTIONS), ("with", QUESTIONS_WITH_DOCS))}
    per_question = {name: [row["variants"]["base"] for row in report["rows"]] for name, report in reports.items()}
    out = {"questions": len(questions), "top_k": C.TOP_K, "variant": "base", "layout": run.settings["prompt"]["layout"]}
    for key, label in METRICS:
        without = [row[key] for row in per_question["without"]]
        with_docs = [row[key] for row in per_question["with"]]
        out[key] = {"label": label, "without": sum(without) / len(without), "with": sum(with_docs) / len(with_docs),
                    "difference": paired_bootstrap(without, with_docs)}
    return out


def print_summary(summary: dict) -> None:
    r, p, e = summary["retrieval"], summary["pretrain"], summary["eval"]
    lines = [
        "",
        "== exar demo --docs: what was measured ==",
        "stage timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["timings_s"].items()),
        f"documents: {', '.join(d['name'] for d in summary['documents'])}, {summary['passages']} passages "
        f"(BM25 through {summary['retriever']['library']})",
        f"retrieval over {r['questions']} questions: " + ", ".join(f"{k} {r[k]:.3f}" for k in r if k.startswith("recall@")),
    ]
    if p.get("ppl_before") is not None:
        lines.append(f"pre-training ({p['steps']} steps, {p['bits']}-bit): perplexity on {p['chunks']['held_out']} "
                     f"held-out chunks ({p['held_out_tokens']} tokens) {p['ppl_before']:.2f} -> {p['ppl_after']:.2f}")
    lines.append(f"{e['variant']} model on {e['questions']} questions, without -> with the top {e['top_k']} passages "
                 "(difference, 95% paired-bootstrap interval):")
    for key, _ in METRICS:
        m, d = e[key], e[key]["difference"]
        lines.append(f"  {m['label']:<13} {m['without']:.3f} -> {m['with']:.3f}   "
                     f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{'  significant' if d['significant'] else ''}")
    print("\n".join(lines), flush=True)
