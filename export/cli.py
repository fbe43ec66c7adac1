"""exar-export: the command line of exar.export (a thin layer over ``export_run``)."""

import click

from exar.clikit import debug_option, entry_point, json_option, run_option, version_option
from exar.constants import DEFAULT_QUANT


@click.command(name="exar-export", context_settings={"help_option_names": ["-h", "--help"]})
@run_option
@click.option("--quant", "quants", multiple=True, default=(DEFAULT_QUANT,), show_default=True, metavar="TYPE",
              help="llama.cpp quant type, repeatable: q4_0, q4_1, q5_0, q5_1, q8_0, q4_k_m, q5_k_m, q6_k, ... "
                   "(`--quant list` shows them all).")
@click.option("--mode", type=click.Choice(["merged", "adapters", "both"]), default="both", show_default=True,
              help="adapters: one base GGUF + a small LoRA GGUF per role (what exar-edge loads by default, a third "
                   "of the memory); merged: one full GGUF per role, plus hf/ and consolidated/.")
@click.option("--outtype", type=click.Choice(["f16", "bf16", "f32"]), default="f16", show_default=True,
              help="Precision of the unquantized GGUFs and of the merged HF weights.")
@click.option("--pure", is_flag=True, help="Quantize every matrix to TYPE (no higher-precision output/embedding, as llama-quantize --pure).")
@click.option("--no-consolidated", is_flag=True, help="Skip Meta's consolidated.NN.pth layout.")
@click.option("--merge-base", type=click.Choice(["w16", "nf4-roundtrip"]), default="w16", show_default=True,
              help="Merge into the 16/32-bit base (w16) or into its NF4 round trip, the base QLoRA trained against.")
@click.option("--ollama", is_flag=True, help="Also write Ollama Modelfiles (FROM, TEMPLATE in exar's prompt layout, stops).")
@click.option("--threads", type=int, default=None, help="Threads for quantization and checks (default: all cores).")
@click.option("--verbose", is_flag=True, help="Show llama.cpp's native log instead of writing it to gguf/llama-cpp.log.")
@json_option
@version_option
@debug_option
def cli(run_dir, quants, mode, outtype, pure, no_consolidated, merge_base, ollama, threads, verbose, as_json):
    """Take a run's adapters to files llama.cpp runs on a laptop, and prove they compute what was trained.

    \b
    Writes (DESIGN.md names, all recorded in manifest.json with their checks):
      gguf/base.<outtype>.gguf  gguf/base.<quant>.gguf  gguf/<role>.lora.gguf      (--mode adapters)
      hf/<role>/  consolidated/<role>/  gguf/<role>.<outtype>.gguf  gguf/<role>.<quant>.gguf  (--mode merged)
    Every GGUF is checked: vocabulary and token ids equal to the HF tokenizer's (the three EXAR
    prompts included), logits within tolerance of transformers, and each quantized file's mean KL
    divergence and top-1 agreement against the unquantized one. Unchanged artifacts are skipped.

    \b
    Example:  exar-export --quant q4_0 --quant q8_0 --mode both
    """
    from exar.clikit import echo_json, open_run
    from exar.export.pipeline import ExportOptions, export_run
    from exar.export.quantize import NEEDS_IMATRIX, quant_types

    if "list" in quants:
        for name in sorted(quant_types()):
            click.echo(name + ("  (needs an importance matrix: refused)" if name in NEEDS_IMATRIX else ""))
        return
    run = open_run(run_dir)
    options = ExportOptions(quants=tuple(dict.fromkeys(quants)), mode=mode, outtype=outtype, pure=pure,
                            consolidated=not no_consolidated, merge_base=merge_base, ollama=ollama,
                            verbose=verbose, threads=threads)
    summary = export_run(run, options, echo=lambda line: click.echo(line, err=True))
    if as_json:
        echo_json(summary)
    else:
        click.echo(summary_table(summary))


def summary_table(summary: dict) -> str:
    """Checks per GGUF: unquantized files against transformers, quantized ones against the unquantized."""
    lines = [f"{'file':<30} {'check':<44}"]
    for rel, check in summary["verification"].items():
        if "mean_kl" in check:
            text = f"mean KL {check['mean_kl']:.5f}  top-1 {check['top1_agreement']:.1%}  ({check['tokens']} tokens)"
        else:
            text = (f"{'ok' if check['passed'] else 'FAILED'}: vocab + ids of {check['texts']} texts, "
                    f"logits {check['logit_rel_max_diff']:.1e} <= {check['logit_tolerance']:.0e}")
        lines.append(f"{rel:<30} {text}")
    return "\n".join(lines)


main = entry_point(cli)
