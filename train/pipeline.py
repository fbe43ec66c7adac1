"""The train stage as plain functions (callable without the CLI): data, the three roles, the chain.

Each step skips work the run's manifest already holds (unless ``force``) and resumes an
interrupted one (training checkpoints, appended predictions).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from exar import constants as C
from exar.basemodel import prompt_style, resolve_base
from exar.data import QA, filter_qa, load_qa, read_jsonl, split_qa, write_jsonl
from exar.errors import ExarError
from exar.prompts import CORRECT, PromptStyle
from exar.rundir import Run
from exar.train import examples as ex
from exar.train.settings import ROLE_SECTIONS, TrainSettings

ADD_REFERENCES = ("auto", "always", "never")


@dataclass(frozen=True)
class DataOptions:
    """How QA data is read, filtered and split (recorded in run.json ``data``)."""

    fmt: str = "auto"
    question_field: str | None = None
    answer_field: str | None = None
    context_field: str | None = None
    categories: tuple[str, ...] = ()
    max_answer_chars: int | None = None
    context: str = "any"
    test_fraction: float = C.TEST_FRACTION
    split_seed: int = C.SPLIT_SEED
    skip_bad: bool = False
    limit: int | None = None


def prepare_data(base: str | Path, data: str | Path, *, run_dir: str | Path | None = None,
                 options: DataOptions = DataOptions(), layout: str = "plain", force: bool = False) -> Run:
    """Resolve the base, load/filter/split the data, and write them into a run (new or given).

    Everything is checked before the run is touched, so bad input leaves nothing behind.
    """
    base_model = resolve_base(base)
    style = prompt_style(base_model.path, layout)
    loaded = load_qa(data, fmt=options.fmt, question_field=options.question_field,
                     answer_field=options.answer_field, context_field=options.context_field,
                     skip_bad=options.skip_bad)
    records = filter_qa(loaded.records, categories=options.categories,
                        max_answer_chars=options.max_answer_chars, context=options.context)
    if options.limit is not None:
        records = records[:options.limit]
    train, test = split_qa(records, test_fraction=options.test_fraction, seed=options.split_seed)
    if not train:
        raise ExarError(f"{data}: no training questions left after the split "
                        f"({len(records)} records, --test-fraction {options.test_fraction})")
    section = {
        "source": str(Path(data).resolve()), "format": loaded.format,
        "fields": {"question": options.question_field, "answer": options.answer_field,
                   "context": options.context_field},
        "filters": {"categories": list(options.categories), "max_answer_chars": options.max_answer_chars,
                    "context": options.context, "limit": options.limit},
        "split": {"test_fraction": options.test_fraction, "seed": options.split_seed},
        "counts": {"loaded": len(loaded.records), "skipped_bad": loaded.skipped, "kept": len(records),
                   "train": len(train), "test": len(test)},
    }

    run = Run.open_or_create(run_dir)
    run.bind_base(base_model.to_dict())
    recorded = run.settings.get("data")
    if run.has(C.TRAIN_SPLIT) and not force:
        if recorded != section or run.settings.get("prompt") != style.to_dict():
            raise ExarError(f"{run.root}: this run already holds data from {recorded.get('source')} with other "
                            "settings (or another --layout); pass --force to replace it, or use a new --run")
        return run
    for rel, rows in ((C.TRAIN_SPLIT, train), (C.TEST_SPLIT, test)):
        with run.writing(rel, "split", made_from=[]) as tmp:
            write_jsonl(tmp, (r.to_dict() for r in rows))
    run.update_settings("data", section)
    run.update_settings("prompt", style.to_dict())
    print(f"data: {len(train)} train / {len(test)} test questions in {run.root}", file=sys.stderr)
    return run


@dataclass
class RoleData:
    """A role's training and validation rows, with what was done to build them."""

    train: list[ex.Example]
    eval: list[ex.Example]
    facts: dict = field(default_factory=dict)


def role_data(run: Run, role: str, settings: TrainSettings, add_references: str = "auto") -> RoleData:
    """The rows a role trains on; the validation slice is carved (by question) before balancing."""
    from exar.train.trainer import split_for_eval

    style = PromptStyle.from_dict(run.settings["prompt"])
    if role == "answer":
        run.verify(C.TRAIN_SPLIT)
        records = [QA.from_dict(r) for r in read_jsonl(run.path(C.TRAIN_SPLIT))]
        train, held = split_for_eval(ex.answer_examples(records, style), settings.eval_fraction, settings.seed)
        return RoleData(train, held)

    run.verify(C.DATASET_PLUS)
    rows = read_jsonl(run.path(C.DATASET_PLUS))
    if not rows:
        raise ExarError(f"{run.path(C.DATASET_PLUS)}: DATASET+ is empty")
    if role == "exar":
        train, held = split_for_eval(ex.exar_examples(rows, style), settings.eval_fraction, settings.seed)
        return RoleData(train, held)
    if role != "validator":
        raise ExarError(f"unknown role {role!r}; roles are {', '.join(C.ROLES)}")
    if add_references not in ADD_REFERENCES:
        raise ExarError(f"--add-references must be one of {', '.join(ADD_REFERENCES)}, got {add_references!r}")
    train_rows, held_rows = split_qa(rows, test_fraction=settings.eval_fraction if len(rows) > 1 else 0.0,
                                     seed=settings.seed, question=lambda r: r["question"])
    if not train_rows:
        train_rows, held_rows = rows, []
    train = ex.validator_examples(train_rows, style)
    counts = ex.label_counts(train)
    held = ex.validator_examples(held_rows, style)
    add = add_references == "always" or (add_references == "auto" and counts[CORRECT] == 0)
    if add:  # the same rule on both sides, so the validation slice can calibrate the threshold
        train += ex.reference_examples(train_rows, style)
        held += ex.reference_examples(held_rows, style)
        print(f"validator: added {len(train) - sum(counts.values())} reference answers as CORRECT rows "
              f"(--add-references {add_references}; DATASET+ had {counts[CORRECT]} CORRECT)", file=sys.stderr)
    facts = {"dataset_plus_counts": counts, "references_added": len(train) - sum(counts.values()),
             "add_references": add_references}
    balanced = ex.balance(train, settings.seed)
    facts["balanced_counts"] = ex.label_counts(balanced)
    return RoleData(balanced, held, facts)


def train_role(run: Run, role: str, settings: TrainSettings = TrainSettings(), *, resume: bool = True,
               force: bool = False, add_references: str = "auto", callbacks: Sequence = ()) -> dict:
    """Train one role's adapter into ``adapters/<role>/``; returns its run.json section.

    The validator also gets p(CORRECT) on its validation slice and the threshold maximizing
    balanced accuracy there, which the edge loop accepts at.
    """
    section_name = ROLE_SECTIONS[role]
    if run.has(f"{C.ADAPTERS_DIR}/{role}") and not force:
        print(f"{role}: {run.path(f'{C.ADAPTERS_DIR}/{role}')} is done (use --force to retrain)", file=sys.stderr)
        return run.settings.get(section_name, {})
    from exar.train.trainer import fit_adapter

    data = role_data(run, role, settings, add_references)
    fitted = fit_adapter(run, role, data.train, data.eval, settings, resume=resume and not force, callbacks=callbacks)
    section = {**fitted.summary, **data.facts}
    if role == "validator":
        section.update(_calibrate(fitted, PromptStyle.from_dict(run.settings["prompt"])))
    run.update_settings(section_name, section)
    return section


def _calibrate(fitted, style: PromptStyle) -> dict:
    from exar.train.scoring import best_threshold, classification_numbers, p_correct_hf

    fitted.model.eval()
    scores = p_correct_hf(fitted.model, fitted.tokenizer, [e.prompt for e in fitted.eval_examples], style)
    truth = [e.label == CORRECT for e in fitted.eval_examples]
    threshold, how = best_threshold(scores, truth, C.VALIDATOR_THRESHOLD)
    return {"threshold": threshold, "threshold_metric": "balanced_accuracy", "threshold_chosen_by": how,
            "validation": classification_numbers(scores, truth, threshold)}


def stage_zero(base: str | Path, data: str | Path, settings: TrainSettings = TrainSettings(), *,
               run_dir: str | Path | None = None, options: DataOptions = DataOptions(), layout: str = "plain",
               resume: bool = True, force: bool = False) -> Run:
    """Data into the run, then the ``answer`` adapter (the paper's stage-zero)."""
    _check_bits(settings)
    run = prepare_data(base, data, run_dir=run_dir, options=options, layout=layout, force=force)
    train_role(run, "answer", settings, resume=resume, force=force)
    return run


def run_all(base: str | Path, data: str | Path, settings: TrainSettings = TrainSettings(), *,
            run_dir: str | Path | None = None, options: DataOptions = DataOptions(), layout: str = "plain",
            predict_options: dict | None = None, annotate_options: dict | None = None,
            role_settings: dict[str, TrainSettings] | None = None,
            add_references: str = "auto", resume: bool = True, force: bool = False) -> Run:
    """stage-zero -> predict -> annotate -> validator -> exar, each skipped when already done.

    ``role_settings`` overrides ``settings`` for some roles (the demo gives each its own steps).
    """
    from exar.train.annotate import annotate
    from exar.train.predict import predict

    for_role = {role: (role_settings or {}).get(role, settings) for role in C.ROLES}
    run = stage_zero(base, data, for_role["answer"], run_dir=run_dir, options=options, layout=layout,
                     resume=resume, force=force)
    predict(run, force=force, **(predict_options or {}))
    annotate(run, force=force, **(annotate_options or {}))
    train_role(run, "validator", for_role["validator"], resume=resume, force=force, add_references=add_references)
    train_role(run, "exar", for_role["exar"], resume=resume, force=force)
    return run


def _check_bits(settings: TrainSettings) -> None:
    """Fail on a missing bitsandbytes before anything is written."""
    if settings.bits in (4, 8):
        from exar.train.trainer import require_bitsandbytes

        require_bitsandbytes(settings.bits)
