"""Merge a LoRA adapter into its base: in fp32, into 16/32-bit weights, one tensor at a time.

Merging into 4-bit weights loses what the adapter learned; exar never does it. ``w16`` adds the
adapter to the base as stored (the usual choice); ``nf4-roundtrip`` first replaces every linear
layer by its NF4 (double-quant, blocksize 64) quantize-dequantize round trip, which is the base
QLoRA actually trained against. The eval stage measures both. The merged folder keeps the
base's shard layout; each shard is streamed (``exar.export.streamed``), so memory holds one
tensor and its fp32 copy, never a shard.
"""

from __future__ import annotations

import json
from pathlib import Path

from exar.errors import ExarError
from exar.export.hfmodel import INDEX, TensorSource, copy_tokenizer_files
from exar.export.lora import read_adapter
from exar.export.streamed import OutTensor, write_safetensors
from exar.rundir import atomic_path

MERGE_BASES = ("w16", "nf4-roundtrip")
DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def merge_adapter(base_dir: Path | str, adapter_dir: Path | str, out_dir: Path | str, *, merge_base: str = "w16",
                  dtype: str = "f16", base_names: tuple[str, ...] = (), progress: bool = True) -> dict:
    """Write base + adapter as an HF folder (``dtype`` safetensors + config + tokenizer) at ``out_dir``.

    Checks that every adapted matrix changed and that no merged tensor holds inf or NaN.
    Returns per-module statistics (largest change) for the manifest.
    """
    import torch

    from exar.progress import bar

    if merge_base not in MERGE_BASES:
        raise ExarError(f"unknown merge base {merge_base!r}; choose one of {', '.join(MERGE_BASES)}")
    if dtype not in DTYPES:
        raise ExarError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, DTYPES[dtype])
    base_dir = Path(base_dir)
    adapter = read_adapter(adapter_dir, base_dir, base_names=base_names)
    source = TensorSource(base_dir)
    largest_change: dict[str, float] = {}

    def merged(name: str):
        weight32 = source.load(name).to(torch.float32)
        if merge_base == "nf4-roundtrip" and is_linear(name):
            weight32 = nf4_roundtrip(weight32)
        module = adapter.modules.get(name)
        if module is not None:
            delta = module.delta()
            change = float(delta.abs().max())
            if change == 0.0:
                raise ExarError(f"{adapter_dir}: the adapter does not change {name} (lora_B is zero: was it trained?)")
            weight32 = weight32 + delta
            largest_change[name] = change
        out = weight32.to(torch_dtype)
        if not torch.isfinite(out).all():
            raise ExarError(f"{base_dir}: merged {name} holds inf or NaN in {dtype}; merge with --outtype f32")
        return out

    with atomic_path(out_dir, is_dir=True) as tmp:
        shards = source.by_file()
        for file, names in bar(shards.items(), desc=f"merging {Path(adapter_dir).name}", unit="shard") if progress \
                else shards.items():
            specs = [OutTensor(n, torch_dtype, source.infos[n].shape, lambda n=n: merged(n)) for n in names]
            write_safetensors(tmp / file.name, specs, metadata={"format": "pt"})
        _write_config(base_dir, tmp, DTYPES[dtype])
        copy_tokenizer_files(base_dir, tmp)
    return {"merge_base": merge_base, "dtype": dtype, "modules": len(largest_change),
            "largest_change": max(largest_change.values())}


def is_linear(name: str) -> bool:
    """The layers bitsandbytes quantizes in QLoRA: every projection inside the blocks (not embeddings, not lm_head)."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def nf4_roundtrip(weight):
    """``weight`` after NF4 quantization (blocksize 64, double-quantized statistics) and back, as QLoRA sees it."""
    import bitsandbytes.functional as bnb

    quantized, state = bnb.quantize_4bit(weight.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnb.dequantize_4bit(quantized, state).to(weight.dtype)


def _write_config(base_dir: Path, dest: Path, dtype_name: str) -> None:
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = dtype_name
    config.pop("quantization_config", None)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    index = base_dir / INDEX
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["metadata"] = {"total_size": sum(TensorSource(dest).infos[n].nbytes for n in data["weight_map"])}
        (dest / index.name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
