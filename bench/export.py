"""Export benchmark: HF -> GGUF f16 throughput against copying the same bytes, peak RSS against the
largest tensor, and q4_0 quantization time, on a random-weight Llama of >= 1B parameters.

    python bench/export.py [--shape 1b|7b] [--keep DIR]

The weights (bf16 safetensors, two shards) are written to a temporary folder and deleted after.
The conversion runs in a child process so its peak RSS (VmHWM) is its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008),
}
VOCAB = 32000


def make_model(folder: Path, shape: dict) -> tuple[int, int]:
    """A Llama HF folder with random bf16 weights in two shards; returns (parameters, largest tensor bytes)."""
    import torch
    from safetensors.torch import save_file

    h, i, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **shape)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy2(Path(__file__).resolve().parents[2] / "shared/models/llama2-tokenizer/tokenizer.model", folder)
    shutil.copy2(Path(__file__).resolve().parents[2] / "shared/models/llama2-tokenizer/tokenizer_config.json", folder)
    gen = torch.Generator().manual_seed(0)

    def rand(*dims):
        return (torch.randn(*dims, generator=gen) * 0.02).to(torch.bfloat16)

    params, largest = 0, 0
    halves = [range(0, L // 2), range(L // 2, L)]
    for shard, layers in enumerate(halves):
        tensors = {}
        if shard == 0:
            tensors["model.embed_tokens.weight"] = rand(VOCAB, h)
        for n in layers:
            p = f"model.layers.{n}."
            tensors.update({p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                            p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                            p + "mlp.down_proj.weight": rand(h, i),
                            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
        if shard == 1:
            tensors["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
            tensors["lm_head.weight"] = rand(VOCAB, h)
        params += sum(t.numel() for t in tensors.values())
        largest = max(largest, max(t.numel() * t.element_size() for t in tensors.values()))
        save_file(tensors, str(folder / f"model-{shard + 1:05d}-of-00002.safetensors"), metadata={"format": "pt"})
        del tensors
    return params, largest


def child(src: str, dst: str) -> None:
    """Convert in this process; print seconds (imports excluded), peak RSS and the RSS before converting."""
    import psutil
    import torch  # noqa: F401  the libraries the conversion uses, imported before the clock starts
    import transformers  # noqa: F401

    from exar.export.writer import write_gguf

    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    write_gguf(src, dst, "f16", progress=False)
    elapsed = time.perf_counter() - start
    print(json.dumps({"seconds": elapsed, "peak_rss": peak_rss(), "baseline_rss": baseline}))


def peak_rss() -> int:
    """This process's peak RSS in bytes (the edge runtime's VmHWM reading)."""
    from exar.resources import peak_rss_mb

    return int(peak_rss_mb() * 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="1b")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to use and keep (default: a temporary one)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    work = args.keep or Path(tempfile.mkdtemp(prefix="exar-bench-export-"))
    try:
        model = work / "hf"
        params, largest = make_model(model, SHAPES[args.shape])
        shards = sorted(model.glob("*.safetensors"))
        weight_bytes = sum(s.stat().st_size for s in shards)

        start = time.perf_counter()
        for shard in shards:
            shutil.copyfile(shard, work / f"copy-{shard.name}")
        copy_seconds = time.perf_counter() - start
        for shard in shards:
            (work / f"copy-{shard.name}").unlink()

        out = work / "model.f16.gguf"
        result = subprocess.run([sys.executable, __file__, "--child", str(model), str(out)],
                                check=True, capture_output=True, text=True)
        child_result = json.loads(result.stdout.strip().splitlines()[-1])

        from exar.export.quantize import quantize_gguf

        start = time.perf_counter()
        quantize_gguf(out, work / "model.q4_0.gguf", "q4_0", log_path=work / "quantize.log")
        q4_seconds = time.perf_counter() - start

        ratio = copy_seconds / child_result["seconds"]
        print(f"shape {args.shape}: {params / 1e9:.2f} B parameters, {weight_bytes / 2**30:.2f} GiB bf16 safetensors "
              f"({platform.machine()}, {__import__('os').cpu_count()} cores)")
        print(f"HF -> GGUF f16:      {child_result['seconds']:.1f} s, {weight_bytes / child_result['seconds'] / 2**20:.0f} MiB/s; "
              f"copy of the same bytes {copy_seconds:.1f} s -> {ratio:.2f}x copy speed (target >= 0.5x)")
        peak, base = child_result["peak_rss"], child_result["baseline_rss"]
        print(f"peak RSS:            {peak / 2**30:.2f} GiB = {peak / largest:.1f}x the largest tensor ({largest / 2**20:.0f} MiB "
              f"bf16); above the {base / 2**30:.2f} GiB of the loaded libraries: {(peak - base) / largest:.1f}x")
        print(f"q4_0 quantization:   {q4_seconds:.1f} s ({params / q4_seconds / 1e6:.0f} M parameters/s)")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
