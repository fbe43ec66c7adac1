"""Whole-export benchmark: `exar-export --quant q4_0` (merge, consolidated, GGUF, quantize, LoRA, every
gate) on a random-weight Llama at a real shape, with the time of each step, the peak RSS of the
whole export, and the disk it announced against the disk it used.

    python bench/export_pipeline.py [--shape 1.1b|7b] [--mode both|adapters|merged] [--keep DIR]

The base (bf16 safetensors, two shards, the Llama-2 tokenizer from ../shared) and three random LoRA
adapters (r=16 on q/k/v/o, lora_B non-zero so every merge changes the weights) are written to a
temporary folder, bound to a run as the train stage leaves it, and exported by the exar-export
command in a child process: its peak RSS (getrusage of the child) is the export's own. Its
/proc status is also sampled every 0.2 s, per step: RssAnon is the memory the export itself holds,
RssFile the file pages llama.cpp and safetensors map (page cache the kernel can take back).
"""

from __future__ import annotations

import argparse
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import make_model  # noqa: E402  the base builder of bench/export.py

SHAPES = {
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632),  # TinyLlama-1.1B
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008),  # Llama-2-7B
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_adapter(base: Path, out: Path, shape: dict, seed: int, r: int = 16) -> None:
    """A PEFT LoRA folder written directly (no model load): config by peft, random A and B."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    h, heads, kv = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    dims = {"q_proj": (h, h), "k_proj": (h, h // heads * kv), "v_proj": (h, h // heads * kv), "o_proj": (h, h)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape["num_hidden_layers"]):
        for name, (fan_in, fan_out) in dims.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * 0.02
    out.mkdir(parents=True)
    LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), lora_dropout=0.0, task_type="CAUSAL_LM",
               base_model_name_or_path=str(base)).save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def make_run(root: Path, base: Path, shape: dict) -> None:
    from exar.basemodel import prompt_style, resolve_base
    from exar.constants import ROLES
    from exar.rundir import Run

    run = Run.create(root)
    run.bind_base(resolve_base(base).to_dict())
    run.update_settings("prompt", prompt_style(base).to_dict())
    for seed, role in enumerate(ROLES):
        make_adapter(base, run.path(f"adapters/{role}"), shape, seed + 1)
        run.record(f"adapters/{role}", "adapter", role=role)


class RssSampler(threading.Thread):
    """Peak RssAnon / RssFile (bytes) of a process, overall and since the last ``mark``."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.status, self.every = Path(f"/proc/{pid}/status"), every
        self.peak, self.step = {"anon": 0, "file": 0}, {"anon": 0, "file": 0}

    def mark(self) -> dict:
        step, self.step = self.step, {"anon": 0, "file": 0}
        return step

    def run(self) -> None:
        while True:
            try:
                fields = dict(line.split(":", 1) for line in self.status.read_text().splitlines())
            except (OSError, ValueError):
                return
            if "RssAnon" not in fields:  # exited, not yet reaped
                return
            for key, field in (("anon", "RssAnon"), ("file", "RssFile")):
                value = int(fields[field].split()[0]) * 1024
                self.peak[key], self.step[key] = max(self.peak[key], value), max(self.step[key], value)
            time.sleep(self.every)


def _step_line(rel: str, seconds: float, rss: dict) -> str:
    return (f"  {rel:<32} {seconds:7.1f} s (written and gated); peak RssAnon {rss['anon'] / 2**30:5.2f} GiB, "
            f"RssFile {rss['file'] / 2**30:5.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="1.1b")
    parser.add_argument("--mode", choices=("both", "adapters", "merged"), default="both")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to use and keep (default: a temporary one)")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="exar-bench-export-pipeline-"))
    try:
        base = work / "base"
        start = time.perf_counter()
        params, _ = make_model(base, SHAPES[args.shape])
        make_run(work / "run", base, SHAPES[args.shape])
        setup = time.perf_counter() - start
        base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))

        command = [str(Path(sys.executable).parent / "exar-export"), "--run", str(work / "run"), "--quant", "q4_0",
                   "--mode", args.mode]
        start = time.perf_counter()
        print(f"setup {setup:.0f} s; exporting ({' '.join(command[1:])})", flush=True)
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler = RssSampler(child.pid)
        sampler.start()
        steps, announced, current, foreign = [], None, None, []
        for line in child.stderr:
            stamp = time.perf_counter() - start
            if line.startswith("disk: "):
                announced = line.strip()
            elif line.startswith("writing "):
                if current:
                    steps.append((current[0], stamp - current[1], sampler.mark()))
                    print(_step_line(*steps[-1]), flush=True)  # as it goes: a long run stopped early keeps its figures
                current = (line.split()[1], stamp)
            elif line.startswith("error"):
                print(line.strip())
            elif line.strip() and "%|" not in line and not line.startswith(("unchanged: ", "export: ")):
                foreign.append(line.strip())
        out = child.stdout.read()
        code = child.wait()
        total = time.perf_counter() - start
        if current:
            steps.append((current[0], total - current[1], sampler.mark()))
            print(_step_line(*steps[-1]), flush=True)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        used = sum(p.stat().st_size for p in (work / "run").rglob("*") if p.is_file() and "adapters" not in p.parts)
        adapters = sum(p.stat().st_size for p in (work / "run" / "adapters").rglob("*") if p.is_file())
        need = re.search(r"about ([\d.]+) (GiB|MiB)", announced or "")
        need_bytes = float(need.group(1)) * (2**30 if need.group(2) == "GiB" else 2**20) if need else float("nan")

        print(f"shape {args.shape}: {params / 1e9:.2f} B parameters, {base_bytes / 2**30:.2f} GiB bf16 base; "
              f"3 LoRA adapters r=16 q/k/v/o ({adapters / 2**20:.0f} MiB); setup {setup:.0f} s "
              f"({platform.machine()}, {__import__('os').cpu_count()} cores)")
        print(f"exar-export --quant q4_0 --mode {args.mode}: exit {code}, {total:.0f} s, peak RSS {peak / 2**30:.2f} GiB "
              f"= {peak / base_bytes:.2f}x the base's bytes; sampled peak RssAnon {sampler.peak['anon'] / 2**30:.2f} GiB, "
              f"RssFile {sampler.peak['file'] / 2**30:.2f} GiB")
        print(f"disk: announced {announced!r}; written {used / 2**30:.2f} GiB -> announced/written "
              f"{need_bytes / used:.3f}")
        for step in steps:
            print(_step_line(*step))
        print(f"other stderr lines: {len(foreign)}" + "".join(f"\n  {line}" for line in foreign[:5]))
        if out.strip():
            print(out.strip())
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
