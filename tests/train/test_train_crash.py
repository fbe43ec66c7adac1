"""Training killed after its last checkpoint but before the adapter was saved: the rerun resumes
and leaves what an uninterrupted run leaves (found by bench/faults.py: one validation row too many)."""

from __future__ import annotations

import json

import pytest

from exar.basemodel import prompt_style, resolve_base
from exar.data import QA
from exar.rundir import Run
from exar.train.examples import answer_examples
from exar.train.settings import TrainSettings

QUESTIONS = [QA("What is the capital of France?", "Paris"), QA("Who wrote the book?", "The first author"),
             QA("Which planet is red?", "Mars"), QA("What is the symbol of gold?", "Au")]


class _Killed(BaseException):
    pass


def _run(root, base) -> Run:
    run = Run.create(root)
    run.bind_base(resolve_base(base).to_dict())
    run.update_settings("prompt", prompt_style(base).to_dict())
    return run


def _log(run: Run) -> list[tuple[int, str, float]]:
    rows = [json.loads(line) for line in run.path("logs/answer.train_log.jsonl").read_text().splitlines()]
    return [(r["step"], "loss" if "loss" in r else "eval", r.get("loss", r.get("eval_loss"))) for r in rows]


def test_killed_before_saving_the_rerun_leaves_the_uninterrupted_log(tmp_path, tiny_llama, monkeypatch):
    import exar.train.trainer as trainer

    settings = TrainSettings(max_steps=4, batch_size=2, grad_accum=1, save_steps=2, bits=16)
    examples = answer_examples(QUESTIONS, prompt_style(tiny_llama))
    straight = _run(tmp_path / "straight", tiny_llama)
    trainer.fit_adapter(straight, "answer", examples[:3], examples[3:], settings)

    killed = _run(tmp_path / "killed", tiny_llama)
    save = trainer._save
    monkeypatch.setattr(trainer, "_save", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        trainer.fit_adapter(killed, "answer", examples[:3], examples[3:], settings)
    monkeypatch.setattr(trainer, "_save", save)
    fitted = trainer.fit_adapter(killed, "answer", examples[:3], examples[3:], settings)
    assert fitted.summary["resumed_from"] == "checkpoint-4"
    assert [(s, k) for s, k, _ in _log(killed)] == [(1, "loss"), (2, "loss"), (2, "eval"), (3, "loss"),
                                                    (4, "loss"), (4, "eval")]
    assert [r[:2] for r in _log(killed)] == [r[:2] for r in _log(straight)]
    assert [r[2] for r in _log(killed)] == pytest.approx([r[2] for r in _log(straight)])
