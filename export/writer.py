"""Our HF -> GGUF writer for Llama-architecture models, on the ``gguf`` package.

It writes what llama.cpp's convert_hf_to_gguf.py writes (``LlamaModel`` in conversion/llama.py
at the llama.cpp of the installed llama-cpp-python), checked tensor for tensor and key for key
by the conformance tests: hyper-parameters present in config.json, q/k rows (and biases)
interleaved per head, 1-D tensors and norms in f32, Llama-3.1 rope scaling as a ``rope_freqs``
tensor, tensors in the converter's order, and the vocabulary of ``exar.export.vocab``. Tensors
are declared from the shard headers first, then each is loaded, converted and written while the
next one is being read (two tensors in memory at most).
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from exar.basemodel import read_config
from exar.errors import ExarError
from exar.export.hfmodel import LlamaShape, TensorSource, interleave_qk
from exar.export.vocab import add_vocab, read_vocab
from exar.rundir import atomic_path

_ROPE_TYPES = ("linear", "llama3")  # besides default; others are refused rather than written untested


def write_gguf(hf_dir: Path | str, out_path: Path | str, outtype: str = "f16", *, name: str | None = None,
               progress: bool = True, pre_tokenizer: str | None = None) -> dict:
    """Write the Llama HF folder ``hf_dir`` as a GGUF of ``outtype`` (f16, bf16 or f32) at ``out_path``.

    ``pre_tokenizer`` names llama.cpp's BPE pre-tokenizer when its hash is not in llama.cpp's
    table. Returns a summary: tensor count, bytes, vocabulary route. The file appears under its
    final name only when complete.
    """
    import gguf

    from exar.progress import bar

    qtype = _outtype(outtype)
    hf_dir = Path(hf_dir)
    shape = LlamaShape.read(hf_dir)
    config = read_config(hf_dir)
    source = TensorSource(hf_dir)
    vocab = read_vocab(hf_dir, shape.vocab, hf_tokenizer(hf_dir), pre_override=pre_tokenizer)
    plan = tensor_plan(shape, source, qtype)

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    for item in plan:
        writer.add_tensor_info(item.gguf_name, item.byte_shape, item.np_dtype, item.nbytes, raw_dtype=item.qtype)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or hf_dir.name)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    _add_hparams(writer, shape, config, outtype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, vocab)

    with atomic_path(out_path) as tmp:
        writer.open_output_file(tmp)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(item.nbytes for item in plan)
        chunks = prefetched(plan)
        for data in bar(chunks, desc=f"{hf_dir.name} -> GGUF {outtype}", unit="tensor", total=len(plan)) if progress else chunks:
            writer.write_tensor_data(data)
        writer.close()
    return {"tensors": len(plan), "tensor_bytes": total, "vocab": f"{vocab.model}/{vocab.pre} ({vocab.route})",
            "n_vocab": len(vocab.tokens), "outtype": outtype, **({"vocab_notes": vocab.notes} if vocab.notes else {})}


def hf_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(hf_dir))
    except Exception as e:  # transformers raises many types for unreadable tokenizers
        raise ExarError(f"{hf_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


# --- tensors ----------------------------------------------------------------------------------

@dataclass
class PlannedTensor:
    gguf_name: str
    byte_shape: tuple[int, ...]
    np_dtype: object
    nbytes: int
    qtype: object
    produce: Callable[[], object]


def prefetched(plan: list[PlannedTensor]):
    """The tensors' data in order, each produced (read, permuted, cast) on a thread while the last is written."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(plan[0].produce) if plan else None
        for item in plan[1:]:
            ready = pending.result()
            pending = pool.submit(item.produce)
            yield ready
            del ready
        if pending is not None:
            yield pending.result()


def _outtype(outtype: str):
    import gguf

    types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16}
    if outtype not in types:
        raise ExarError(f"unknown outtype {outtype!r}; choose one of {', '.join(types)}")
    return types[outtype]


@functools.lru_cache(maxsize=4)
def _name_map(n_layers: int):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)


def gguf_tensor_name(hf_name: str, n_layers: int) -> str:
    """llama.cpp's name for an HF Llama tensor (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``)."""
    mapped = _name_map(n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ExarError(f"tensor {hf_name} has no llama.cpp counterpart in a Llama model")
    return mapped


def tensor_plan(shape: LlamaShape, source: TensorSource, qtype) -> list[PlannedTensor]:
    """Every GGUF tensor in the converter's order: rope_freqs first, then the shards' tensors sorted by name."""
    import gguf

    plan = []
    extra = rope_factors(shape)
    if extra is not None:
        plan.append(_planned("rope_freqs.weight", extra.shape, gguf.GGMLQuantizationType.F32, lambda: extra.numpy()))
    for hf_name in source.names():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        info = source.infos[hf_name]
        gguf_name = gguf_tensor_name(hf_name, shape.layers)
        keep_f32 = len(info.shape) <= 1 or gguf_name.endswith("_norm.weight")
        tensor_type = gguf.GGMLQuantizationType.F32 if keep_f32 else qtype
        plan.append(_planned(gguf_name, info.shape, tensor_type, _loader(source, hf_name, shape.qk_heads(hf_name), tensor_type)))
    expected = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not shape.tied else set())
    missing = expected - {p.gguf_name for p in plan}
    if missing:
        raise ExarError(f"{source.folder}: weights lack {', '.join(sorted(missing))}")
    return plan


def _planned(gguf_name: str, logical_shape, tensor_type, produce) -> PlannedTensor:
    import gguf
    import numpy as np

    logical = tuple(int(d) for d in logical_shape)
    if tensor_type == gguf.GGMLQuantizationType.F32:
        return PlannedTensor(gguf_name, logical, np.float32, 4 * math.prod(logical), None, produce)
    if tensor_type == gguf.GGMLQuantizationType.F16:
        return PlannedTensor(gguf_name, logical, np.float16, 2 * math.prod(logical), None, produce)
    byte_shape = gguf.quant_shape_to_byte_shape(logical, tensor_type)
    return PlannedTensor(gguf_name, byte_shape, np.uint8, math.prod(byte_shape), tensor_type, produce)


def _loader(source: TensorSource, hf_name: str, qk_heads: int | None, tensor_type):
    def produce():
        import gguf
        import torch

        tensor = source.load(hf_name)
        if tensor_type == gguf.GGMLQuantizationType.F16:
            tensor = tensor.to(torch.float16)
        elif tensor.dtype != torch.float32:
            tensor = tensor.to(torch.float32)
        if qk_heads is not None:
            tensor = interleave_qk(tensor, qk_heads)
        data = tensor.contiguous().numpy()
        return data if tensor_type in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32) \
            else gguf.quants.quantize(data, tensor_type)

    return produce


def rope_factors(shape: LlamaShape):
    """Llama-3.1-style rope scaling as the ``rope_freqs`` tensor, computed as convert_hf_to_gguf.py does (torch f32)."""
    import torch

    scaling = shape.rope_scaling
    if scaling is None or scaling["rope_type"].lower() != "llama3":
        return None
    dim = shape.head_dim
    freqs = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _add_hparams(writer, shape: LlamaShape, config: dict, outtype: str) -> None:
    """The converter's TextModel + LlamaModel parameters: only what config.json states, in its order."""
    import gguf

    writer.add_block_count(shape.layers)
    if "max_position_embeddings" in config:
        writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    if "num_key_value_heads" in config:
        writer.add_head_count_kv(shape.kv_heads)
    scaling = shape.rope_scaling
    if scaling is not None:
        kind = scaling["rope_type"].lower()
        if kind not in _ROPE_TYPES:
            raise ExarError(f"rope scaling {scaling['rope_type']!r} is not supported by exar's GGUF writer "
                            f"(default, {', '.join(_ROPE_TYPES)} are)")
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(scaling["factor"])
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if config.get("rope_theta") is not None or rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(shape.rope_theta)
    if "rms_norm_eps" in config:
        writer.add_layer_norm_rms_eps(shape.norm_eps)
    if shape.head_dim_in_config:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype])
    writer.add_vocab_size(shape.vocab)
    writer.add_rope_dimension_count(shape.head_dim)
