"""Memory of the export gate's llama.cpp loads: a GGUF + LoRA loaded, run and closed N times.

    python bench/export_memory.py [--loads 3] [--keep DIR]

A random-weight Llama (hidden 1536, 12 layers, GQA 16/4, vocab 32000: 0.4 B parameters) is written
as f16 and q4_0 GGUFs with one LoRA GGUF (r=16, q/k/v/o). Each way of loading runs in its own
process, which loads f16 + LoRA and q4_0 + LoRA in turn, evaluates 63 tokens, closes, and reads
/proc/self/status (RssAnon: the process's own memory; RssFile: mapped file pages) while loaded,
after close(), and after glibc's malloc_trim(0):

- ``lora_path``: llama-cpp-python's ``Llama(path, lora_path=...)`` (the baseline; it turns mmap
  off when given a LoRA);
- ``exar``: ``exar.export.verify.LlamaCppModel`` (the model mapped, the LoRA set on the context).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
SHAPE = dict(hidden_size=1536, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
             intermediate_size=4096)
WAYS = ("lora_path", "exar")


def rss() -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(fields[k].split()[0]) / 2**20 for k in ("RssAnon", "RssFile"))


def build(work: Path) -> None:
    from export import make_model  # noqa: E402  bench/export.py's random base
    from export_pipeline import make_adapter

    from exar.export.lora import write_lora_gguf
    from exar.export.quantize import quantize_gguf
    from exar.export.writer import write_gguf

    make_model(work / "base", SHAPE)
    make_adapter(work / "base", work / "adapter", SHAPE, seed=1)
    write_gguf(work / "base", work / "f16.gguf", "f16", progress=False)
    quantize_gguf(work / "f16.gguf", work / "q4_0.gguf", "q4_0")
    write_lora_gguf(work / "adapter", work / "base", work / "lora.gguf")


def measure(work: Path, way: str, loads: int) -> None:
    """One line per load: RssAnon / RssFile (GiB) loaded, after close, after malloc_trim."""
    from exar.export.verify import LlamaCppModel
    from exar.llamacpp import load_llama_cpp

    llama_cpp = load_llama_cpp()
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    ids = list(range(1, 64))
    print(f"{way}: at start RssAnon {rss()[0]:.2f} GiB")
    for n in range(loads):
        for model in ("f16.gguf", "q4_0.gguf"):
            if way == "exar":
                llm = LlamaCppModel(work / model, work / "lora.gguf")
                llm.logits(ids)
                close = llm.close
            else:
                llm = llama_cpp.Llama(str(work / model), lora_path=str(work / "lora.gguf"), logits_all=True, n_ctx=512,
                                      n_batch=512, n_threads=os.cpu_count(), verbose=False)
                llm.eval(ids)
                close = llm.close
            loaded = rss()
            close()
            closed = rss()
            trim(0)
            trimmed = rss()
            print(f"{way}: load {n + 1} {model:9} loaded anon {loaded[0]:.2f} file {loaded[1]:.2f} | closed anon "
                  f"{closed[0]:.2f} | malloc_trim anon {trimmed[0]:.2f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="work folder to use and keep")
    parser.add_argument("--way", choices=WAYS, default=None, help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args()
    if args.way:
        return measure(args.keep, args.way, args.loads)
    work = args.keep or Path(tempfile.mkdtemp(prefix="exar-bench-export-memory-"))
    try:
        if not (work / "lora.gguf").is_file():
            build(work)
        sizes = {p.name: p.stat().st_size / 2**30 for p in sorted(work.glob("*.gguf"))}
        print("files: " + ", ".join(f"{name} {size:.2f} GiB" for name, size in sizes.items()), flush=True)
        for way in WAYS:
            subprocess.run([sys.executable, __file__, "--way", way, "--keep", str(work), "--loads", str(args.loads)],
                           check=True, stderr=subprocess.DEVNULL)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
