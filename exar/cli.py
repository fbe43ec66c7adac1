"""The `exar` command: one group over the four stages and the demo.

Only click is imported at start-up; each stage imports torch / transformers / llama_cpp inside
the command that needs it, so `exar --help` is instant and an edge-only install works.
"""

import click

from exar.clikit import debug_option, entry_point, version_option
from exar.edge.cli import cli as edge_cli
from exar.eval.cli import cli as eval_cli
from exar.export.cli import cli as export_cli
from exar.train.cli import cli as train_cli


@click.group(name="exar", context_settings={"help_option_names": ["-h", "--help"]})
@version_option
@debug_option
def cli():
    """exar: train three EXAR LoRA adapters, export them to llama.cpp, answer and check on a CPU.

    \b
    exar demo                         the whole pipeline on the built-in SmolLM2-135M
    exar train stage-zero|...|all     (= exar-train) QLoRA adapters and DATASET+
    exar export --quant q4_0          (= exar-export) HF fp16, Meta .pth, GGUF, LoRA-GGUF
    exar edge ask "question"          (= exar-edge) the validate-then-re-answer loop
    exar eval compare --variants ...  (= exar-eval) what quantization cost, with intervals
    """


cli.add_command(train_cli, "train")
cli.add_command(export_cli, "export")
cli.add_command(edge_cli, "edge")
cli.add_command(eval_cli, "eval")


@cli.command()
@click.option("--fast", is_flag=True, help="A few-minute version for CI: fewer questions and steps.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: models/demo, or models/demo-fast with --fast).")
def demo(fast, run_dir):
    """The whole pipeline on the built-in SmolLM2-135M-Instruct and exar's own QA set, CPU only."""
    from exar.demo import run_demo

    run_demo(fast=fast, run_dir=run_dir)


main = entry_point(cli)
