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
@click.option("--pre-tokenizer", default=None, metavar="NAME",
              help="llama.cpp's name for a BPE tokenizer's pre-tokenizer (e.g. llama-bpe), for a tokenizer whose "
                   "hash llama.cpp's table does not know; exar says when it is needed.")
@click.option("--max-kld", type=float, default=None, metavar="KLD",
              help="Gate limit on a quantized file's mean KL divergence to the unquantized one (default: 20x "
                   "llama.cpp's published LLaMA-3-8B figure for the type, e.g. 1.44 for q4_0).")
@click.option("--verbose", is_flag=True, help="Also show llama.cpp's native log (quantization's is kept in "
                                              "gguf/llama-cpp.log either way) and the libraries' warnings.")
@json_option
@version_option
@debug_option
def cli(run_dir, quants, mode, outtype, pure, no_consolidated, merge_base, ollama, threads, pre_tokenizer, max_kld,
        verbose, as_json):
    """Take a run's adapters to files llama.cpp runs on a laptop, and prove they compute what was trained.

    \b
    Writes (DESIGN.md names, all recorded in manifest.json with their gate results):
      gguf/base.<outtype>.gguf  gguf/base.<quant>.gguf  gguf/<role>.lora.gguf      (--mode adapters)
      hf/<role>/  consolidated/<role>/  gguf/<role>.<outtype>.gguf  gguf/<role>.<quant>.gguf  (--mode merged)
    Every file passes a gate or the export fails (exit 1, the file recorded as failed, refused by
    exar-edge and exar-eval): GGUF vocabulary and token ids equal to the HF tokenizer's and logits
    within tolerance of transformers (+ the PEFT adapter for LoRA GGUFs); quantized files (merged,
    and base + LoRA) within llama.cpp's published KL-divergence and top-1 limits for their type;
    merged HF weights against the PEFT model; consolidated tensors bit for bit. Llama, Llama-3.x,
    TinyLlama, SmolLM and Mistral bases are supported. Unchanged, passed artifacts are skipped.

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
                            verbose=verbose, threads=threads, pre_tokenizer=pre_tokenizer, max_kld=max_kld)
    summary = export_run(run, options, echo=lambda line: click.echo(line, err=True))
    if as_json:
        echo_json(summary)
    else:
        click.echo(summary_table(summary))


def summary_table(summary: dict) -> str:
    """One line per file: its gate verdict and the checks' values against their limits."""
    lines = [f"{'file':<30} gate"]
    for rel, gate in summary["gates"].items():
        if not gate:
            continue
        checks = "; ".join(f"{c['check']} {c['value']:.3g} {'<=' if c['at_most'] else '>='} {c['limit']:.3g}"
                           for c in gate["checks"])
        lines.append(f"{rel:<30} {'passed' if gate['passed'] else 'FAILED'}: {checks}")
    return "\n".join(lines)


main = entry_point(cli)
