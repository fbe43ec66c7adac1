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
from exar.errors import BadRecord, ExarError
from exar.prompts import CORRECT, PromptStyle
from exar.retrieval import retrieved_splits
from exar.rundir import Run, one_writer, sha256_file, writes_run
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
    dev_fraction: float = C.DEV_FRACTION
    split_seed: int = C.SPLIT_SEED
    skip_bad: bool = False
    limit: int | None = None
    retrieve: str | None = None   # an exar-edge index: its top passages join each train/dev row's context
    retrieve_k: int = C.TOP_K


@one_writer
def prepare_data(base: str | Path, data: str | Path, *, run_dir: str | Path | None = None,
                 options: DataOptions = DataOptions(), layout: str = "plain", force: bool = False) -> Run:
    """Resolve the base, load/filter/split the data, and write them into a run (new or given).

    Three splits, by question: ``test`` (held out from everything), ``dev`` (held out from every
    adapter's training: validation losses, and the validator's threshold is fitted on stage-zero's
    answers to these questions) and ``train``. Everything is checked before the run is touched,
    so bad input leaves nothing behind.
    """
    base_model = resolve_base(base)
    style = prompt_style(base_model.path, layout)
    try:
        loaded = load_qa(data, fmt=options.fmt, question_field=options.question_field,
                         answer_field=options.answer_field, context_field=options.context_field,
                         skip_bad=options.skip_bad)
    except BadRecord as error:
        raise ExarError(f"{error} (--skip-bad skips such records and counts them)") from None
    records = filter_qa(loaded.records, categories=options.categories,
                        max_answer_chars=options.max_answer_chars, context=options.context)
    if options.limit is not None:
        records = records[:options.limit]
    train, test = split_qa(records, test_fraction=options.test_fraction, seed=options.split_seed)
    train, dev = split_qa(train, test_fraction=options.dev_fraction, seed=options.split_seed + 1)
    if not train:
        raise ExarError(f"{data}: no training questions left after the split "
                        f"({len(records)} records, --test-fraction {options.test_fraction}, "
                        f"--dev-fraction {options.dev_fraction})")
    (train, dev), retrieved = retrieved_splits(options.retrieve, options.retrieve_k, train, dev)
    section = {
        "source": str(Path(data).resolve()), "sha256": sha256_file(Path(data)), "format": loaded.format,
        "fields": {"question": options.question_field, "answer": options.answer_field,
                   "context": options.context_field},
        "filters": {"categories": list(options.categories), "max_answer_chars": options.max_answer_chars,
                    "context": options.context, "limit": options.limit},
        "split": {"test_fraction": options.test_fraction, "dev_fraction": options.dev_fraction,
                  "seed": options.split_seed},
        "counts": {"loaded": len(loaded.records), "skipped_bad": loaded.skipped, "kept": len(records),
                   "train": len(train), "dev": len(dev), "test": len(test)},
        **({"retrieve": retrieved} if retrieved else {}),
    }

    run = Run.open_or_create(run_dir)
    with run.lock("data"):
        run.bind_base(base_model.to_dict())
        recorded = run.settings.get("data")
        if run.done(C.TRAIN_SPLIT, force=force):
            if recorded != section or run.settings.get("prompt") != style.to_dict():
                raise ExarError(f"{run.root}: this run already holds data from {recorded.get('source')} with other "
                                "settings, other contents (or another --layout); pass --force to replace it, or use "
                                "a new --run")
            return run
        for rel, rows in ((C.TRAIN_SPLIT, train), (C.DEV_SPLIT, dev), (C.TEST_SPLIT, test)):
            with run.writing(rel, "split", made_from=[]) as tmp:
                write_jsonl(tmp, (r.to_dict() for r in rows))
        run.update_settings("data", section)
        run.update_settings("prompt", style.to_dict())
    skipped = f" ({loaded.skipped} bad records skipped)" if loaded.skipped else ""
    print(f"data: {len(train)} train / {len(dev)} dev / {len(test)} test questions in {run.root}{skipped}",
          file=sys.stderr)
    return run


@dataclass
class RoleData:
    """A role's training rows and its validation rows (from the dev questions), with what was done."""

    train: list[ex.Example]
    eval: list[ex.Example]
    facts: dict = field(default_factory=dict)


def dataset_plus(run: Run) -> tuple[list[dict], list[dict]]:
    """DATASET+ rows of the train questions, and of the dev questions (``split`` == "dev")."""
    run.verify(C.DATASET_PLUS)
    rows = read_jsonl(run.path(C.DATASET_PLUS))
    train = [r for r in rows if r.get("split", "train") != "dev"]
    if not train:
        raise ExarError(f"{run.path(C.DATASET_PLUS)}: DATASET+ holds no answers to train questions")
    return train, [r for r in rows if r.get("split") == "dev"]


def role_data(run: Run, role: str, settings: TrainSettings, add_references: str = "auto") -> RoleData:
    """The rows a role trains on (train questions) and is validated on (dev questions)."""
    style = PromptStyle.from_dict(run.settings["prompt"])
    if role == "answer":
        def records(rel: str) -> list[QA]:
            run.verify(rel)
            return [QA.from_dict(r) for r in read_jsonl(run.path(rel))]

        return RoleData(ex.answer_examples(records(C.TRAIN_SPLIT), style), ex.answer_examples(records(C.DEV_SPLIT), style))
    train_rows, dev_rows = dataset_plus(run)
    if role == "exar":
        return RoleData(ex.exar_examples(train_rows, style), ex.exar_examples(dev_rows, style))
    if role != "validator":
        raise ExarError(f"unknown role {role!r}; roles are {', '.join(C.ROLES)}")
    if add_references not in ADD_REFERENCES:
        raise ExarError(f"--add-references must be one of {', '.join(ADD_REFERENCES)}, got {add_references!r}")
    train = ex.validator_examples(train_rows, style)
    counts = ex.label_counts(train)
    if add_references == "always" or (add_references == "auto" and counts[CORRECT] == 0):
        train += ex.reference_examples(train_rows, style)
        print(f"validator: added {len(train) - sum(counts.values())} reference answers as CORRECT rows "
              f"(--add-references {add_references}; DATASET+ had {counts[CORRECT]} CORRECT)", file=sys.stderr)
    facts = {"dataset_plus_counts": counts, "references_added": len(train) - sum(counts.values()),
             "add_references": add_references}
    balanced = ex.balance(train, settings.seed)
    facts["balanced_counts"] = ex.label_counts(balanced)
    return RoleData(balanced, ex.validator_examples(dev_rows, style), facts)


@writes_run("train", every_rank=True)
def train_role(run: Run, role: str, settings: TrainSettings = TrainSettings(), *, resume: bool = True,
               force: bool = False, add_references: str = "auto", callbacks: Sequence = ()) -> dict:
    """Train one role's adapter into ``adapters/<role>/``; returns its run.json section.

    The validator also gets its threshold, fitted on stage-zero's answers to the dev questions
    (``calibrate``), which the edge loop accepts at.
    """
    section_name = ROLE_SECTIONS[role]
    if run.done(f"{C.ADAPTERS_DIR}/{role}", force=force):
        print(f"{role}: {run.path(f'{C.ADAPTERS_DIR}/{role}')} is done (use --force to retrain)", file=sys.stderr)
        return run.settings.get(section_name, {})
    from exar.train.trainer import fit_adapter

    data = role_data(run, role, settings, add_references)
    fitted = fit_adapter(run, role, data.train, data.eval if settings.validation_loss else [], settings,
                         resume=resume and not force, callbacks=callbacks)
    section = {**fitted.summary, **data.facts}
    if role == "validator":
        del fitted  # calibration loads the saved adapter on the 16-bit base, as it is deployed
        section["calibration"] = calibrate(run, PromptStyle.from_dict(run.settings["prompt"]), data.eval)
        section["threshold"] = section["calibration"]["threshold"]
        warning = section["calibration"]["warning"]
        if warning:
            print(f"validator: WARNING: {warning}; the loop will (almost) never re-answer or always will. "
                  "Train the validator longer or on more DATASET+ rows, or pass --threshold at the edge",
                  file=sys.stderr)
    one_writer(run.update_settings)(section_name, section)
    return section


def calibrate(run: Run, style: PromptStyle, dev: Sequence[ex.Example]) -> dict:
    """p(CORRECT) of the dev answers (questions no adapter trained on) and the threshold fitted there.

    The saved validator adapter runs on the 16-bit base (``C.INFERENCE_BITS``), the model export
    deploys. The objective's value is measured on the same answers it was fitted on (in-sample);
    the held-out figures come from ``exar-eval compare`` on the test split.
    """
    from exar.metrics import auroc, fit_threshold
    from exar.train.predict import load_role
    from exar.train.scoring import p_correct_hf

    truth = [e.label == CORRECT for e in dev]
    scores = []
    if dev:
        model, tokenizer = load_role(run, "validator")
        scores = p_correct_hf(model, tokenizer, [e.prompt for e in dev], style)
    fit = fit_threshold(scores, truth, objective=C.THRESHOLD_OBJECTIVE, default=C.VALIDATOR_THRESHOLD)
    return {"slice": f"{C.DATASET_PLUS} rows with split=dev (stage-zero's answers to {C.DEV_SPLIT})",
            "base_bits": C.INFERENCE_BITS,
            "questions": len({e.question for e in dev}), "answers": len(dev),
            "auroc": _finite(auroc(scores, truth)), **fit}


def _finite(value: float) -> float | None:
    """NaN (an AUROC with one class missing) as null in run.json."""
    return None if value != value else value


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
