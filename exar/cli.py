"""The `exar` command: one group over the four stages and the demo.

Only click is imported at start-up; each stage imports torch / transformers / llama_cpp inside
the command that needs it, so `exar --help` is instant and an edge-only install works.
"""

import click

from exar.clikit import debug_option, entry_point, json_option, run_option, verbose_option, version_option
from exar.edge.cli import cli as edge_cli
from exar.eval.cli import cli as eval_cli
from exar.export.cli import cli as export_cli
from exar.train.cli import cli as train_cli


@click.group(name="exar", context_settings={"help_option_names": ["-h", "--help"]})
@version_option
@debug_option
@verbose_option
def cli():
    """exar: train three EXAR LoRA adapters, export them to llama.cpp, answer and check on a CPU.

    \b
    exar demo                         the whole pipeline on the built-in SmolLM2-135M
    exar train stage-zero|...|all     (= exar-train) QLoRA adapters and DATASET+
    exar export --quant q4_0          (= exar-export) HF fp16, Meta .pth, GGUF, LoRA-GGUF
    exar edge ask "question"          (= exar-edge) the validate-then-re-answer loop
    exar eval compare --variants ...  (= exar-eval) what quantization cost, with intervals
    exar status                       what a run holds, and what is stale (made from what)
    """


cli.add_command(train_cli, "train")
cli.add_command(export_cli, "export")
cli.add_command(edge_cli, "edge")
cli.add_command(eval_cli, "eval")


@cli.command()
@click.option("--fast", is_flag=True, help="A few-minute version for CI: fewer questions and steps.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: models/demo, or models/demo-fast with --fast).")
@click.option("--docs", is_flag=True, help="Your own documents instead, on the shipped Vellmar handbook: BM25 "
                                           "recall@1/@5, pre-training perplexity, answers without vs with retrieval.")
def demo(fast, run_dir, docs):
    """The whole pipeline on the built-in SmolLM2-135M-Instruct and exar's own QA set, CPU only."""
    if docs:
        from exar.demo_docs import run_docs_demo

        run_docs_demo(fast=fast, run_dir=run_dir)
        return
    from exar.demo import run_demo

    run_demo(fast=fast, run_dir=run_dir)


@cli.command()
@run_option
@json_option
def status(run_dir, as_json):
    """What a run holds: every artifact, whether its bytes are intact, and what is stale (made from
    inputs that were redone since) with what it was made from. A stale artifact is redone by its
    stage with --force."""
    from exar.clikit import echo_json, open_run

    run = open_run(run_dir)
    rows, writer = run.status(), run.writer()
    if as_json:
        echo_json({"run": str(run.root), "base": (run.settings.get("base") or {}).get("name"), "writer": writer,
                   "artifacts": rows})
        return
    click.echo(f"run {run.root} (base {(run.settings.get('base') or {}).get('name', '-')})")
    click.echo(f"writer: {writer or 'none'}")
    width = max((len(r["path"]) for r in rows), default=10)
    for row in rows:
        click.echo(f"  {row['state'].upper():<8} {row['path']:<{width}}  {row['kind']:<13} {_size(row['bytes']):>10}"
                   f"  {row['created'] or ''}")
        inputs = ", ".join(f"{src} ({(sha or 'unrecorded')[:12]})" for src, sha in row["made_from"].items())
        if row["state"] != "ok" and inputs:
            click.echo(f"           made from {inputs}")
        for why in row["why"]:
            click.echo(f"           stale: {why}")
    counts = {state: sum(r["state"] == state for r in rows) for state in ("ok", "stale", "changed", "missing")}
    click.echo(f"{len(rows)} artifacts: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    if counts["stale"]:
        click.echo("redo a stale artifact with its stage and --force (which marks what is made from it stale too)")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


main = entry_point(cli)
