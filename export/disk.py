"""How many bytes each export artifact will take, from the tensor shapes (told before anything is written).

Unquantized files are exact up to headers and the vocabulary (counted as the tokenizer files'
size). Quantized files follow llama.cpp's rules for the legacy types (each matrix in the type's
blocks, rows that do not fit its block kept in f16, ``output.weight`` in q6_K unless ``pure``);
the k-quant mixes, whose per-tensor choices vary, count at their average bits per weight on
Llama-2-7B (llama.cpp's tools/quantize/README.md).
"""

from __future__ import annotations

from pathlib import Path

from exar.export.hfmodel import TensorSource, safetensors_infos

OUTTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
_MIX_BITS = {"q2_k": 3.0, "q2_k_s": 2.9, "q3_k_s": 3.5, "q3_k_m": 3.9, "q3_k_l": 4.3, "q4_k_s": 4.6, "q4_k_m": 4.85,
             "q5_k_s": 5.55, "q5_k_m": 5.7}
_FALLBACK_BITS = 8.5


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def tokenizer_bytes(folder: Path) -> int:
    names = ("tokenizer.json", "tokenizer.model")
    return max((Path(folder, n).stat().st_size for n in names if Path(folder, n).is_file()), default=0)


def gguf_bytes(source: TensorSource, outtype: str) -> int:
    """An unquantized GGUF: matrices in ``outtype``, vectors in f32, plus the vocabulary."""
    total = tokenizer_bytes(source.folder)
    for info in source.infos.values():
        total += _numel(info.shape) * (OUTTYPE_BYTES[outtype] if len(info.shape) > 1 else 4)
    return total


def quant_bytes(source: TensorSource, quant: str, pure: bool = False) -> int:
    """A GGUF quantized by llama.cpp to ``quant``."""
    import gguf

    from exar.export.quantize import base_type

    total = tokenizer_bytes(source.folder)
    ggml = gguf.GGMLQuantizationType.__members__.get(base_type(quant).upper())
    output = "lm_head.weight" if "lm_head.weight" in source else "model.embed_tokens.weight"  # tied: llama.cpp's rule
    for info in source.infos.values():
        numel = _numel(info.shape)
        if len(info.shape) < 2:
            total += 4 * numel
            continue
        kind = ggml
        if info.name == output and not pure and quant != "q8_0":
            kind = gguf.GGMLQuantizationType.Q6_K if info.shape[-1] % 256 == 0 else gguf.GGMLQuantizationType.Q8_0
        if quant in _MIX_BITS and kind == ggml:
            total += int(numel * _MIX_BITS[quant] / 8)
        elif kind is None:
            total += int(numel * _FALLBACK_BITS / 8)
        else:
            block, size = gguf.GGML_QUANT_SIZES[kind]
            rows = info.shape[-1]
            total += numel * size // block if rows % block == 0 else 2 * numel
    return total


def checkpoint_bytes(source: TensorSource, outtype: str | None, explicit_output: bool = False) -> int:
    """A safetensors or .pth checkpoint of the same tensors (in ``outtype``, or as stored), with an output matrix if asked."""
    total = tokenizer_bytes(source.folder)
    for info in source.infos.values():
        total += _numel(info.shape) * OUTTYPE_BYTES[outtype] if outtype else info.nbytes
    if explicit_output and "lm_head.weight" not in source:
        info = source.infos["model.embed_tokens.weight"]
        total += _numel(info.shape) * OUTTYPE_BYTES[outtype] if outtype else info.nbytes
    return total


def lora_bytes(adapter_dir: Path) -> int:
    """A LoRA GGUF: every A and B matrix in f32."""
    from exar.export.lora import WEIGHTS

    return sum(4 * _numel(i.shape) for i in safetensors_infos(Path(adapter_dir) / WEIGHTS).values()) + 4096


def human(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
