"""Our HF -> GGUF writer for Llama models, on the ``gguf`` package.

Conventions follow llama.cpp's convert_hf_to_gguf.py: q/k rows interleaved per head, 1-D
tensors kept f32, no ``output.weight`` when embeddings are tied, SentencePiece vocabularies as
``llama`` and byte-level BPE as ``gpt2`` with the pre-tokenizer named (``llama-bpe``,
``smollm``, ``gpt-2``), special tokens, add-BOS flag and chat template. Tensors are declared
from the safetensors headers first, then loaded, converted and written one at a time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from exar.basemodel import prompt_style
from exar.errors import ExarError
from exar.export.hfmodel import LlamaShape, TensorSource, interleave_qk
from exar.rundir import atomic_path

# convert_hf_to_gguf.py tells BPE pre-tokenizers apart by hashing the ids of this text.
_BPE_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_BPE_PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",   # Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",      # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


@dataclass(frozen=True)
class Vocab:
    model: str                  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str                    # pre-tokenizer name for llama.cpp
    tokens: list[str]
    scores: list[float] | None
    types: list[int]


def write_gguf(hf_dir: Path | str, out_path: Path | str, outtype: str = "f16", *, name: str | None = None,
               progress: bool = True) -> dict:
    """Write the Llama HF folder ``hf_dir`` as a GGUF of ``outtype`` (f16, bf16 or f32) at ``out_path``.

    Returns a summary: tensor count, bytes, vocabulary kind. The file appears under its final
    name only when complete.
    """
    import gguf

    from exar.progress import bar

    qtype = _outtype(outtype)
    hf_dir = Path(hf_dir)
    shape = LlamaShape.read(hf_dir)
    source = TensorSource(hf_dir)
    tokenizer = _hf_tokenizer(hf_dir)
    vocab = read_vocab(hf_dir, shape.vocab, tokenizer)
    plan = _tensor_plan(shape, source, qtype)

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or hf_dir.name)
    _add_hparams(writer, shape)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, hf_dir, vocab, tokenizer)
    for item in plan:
        writer.add_tensor_info(item.gguf_name, item.byte_shape, item.np_dtype, item.nbytes, raw_dtype=item.qtype)

    with atomic_path(out_path) as tmp:
        writer.open_output_file(tmp)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(item.nbytes for item in plan)
        steps = bar(plan, desc=f"{hf_dir.name} -> GGUF {outtype}", unit="tensor") if progress else plan
        for item in steps:
            writer.write_tensor_data(item.produce())
        writer.close()
    return {"tensors": len(plan), "tensor_bytes": total, "vocab": f"{vocab.model}/{vocab.pre}",
            "n_vocab": len(vocab.tokens), "outtype": outtype}


# --- tensors ----------------------------------------------------------------------------------

@dataclass
class _PlannedTensor:
    gguf_name: str
    byte_shape: tuple[int, ...]
    np_dtype: object
    nbytes: int
    qtype: object
    produce: Callable[[], object]


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


def _tensor_plan(shape: LlamaShape, source: TensorSource, qtype) -> list[_PlannedTensor]:
    import gguf

    plan = []  # with tied embeddings there is no output.weight: llama.cpp reuses token_embd
    for hf_name in source.names():
        if hf_name.endswith("rotary_emb.inv_freq") or (shape.tied and hf_name == "lm_head.weight"):
            continue
        info = source.infos[hf_name]
        gguf_name = gguf_tensor_name(hf_name, shape.layers)
        tensor_type = qtype if len(info.shape) > 1 else gguf.GGMLQuantizationType.F32
        plan.append(_planned(gguf_name, info.shape, tensor_type,
                             _loader(source, hf_name, shape.qk_heads(hf_name), tensor_type)))
    extra = _rope_factors(shape)
    if extra is not None:
        plan.append(_planned("rope_freqs.weight", extra.shape, gguf.GGMLQuantizationType.F32, lambda: extra))
    expected = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not shape.tied else set())
    missing = expected - {p.gguf_name for p in plan}
    if missing:
        raise ExarError(f"{source.folder}: weights lack {', '.join(sorted(missing))}")
    return plan


def _planned(gguf_name: str, logical_shape, tensor_type, produce) -> _PlannedTensor:
    import gguf
    import numpy as np

    logical = tuple(int(d) for d in logical_shape)
    if tensor_type == gguf.GGMLQuantizationType.F32:
        return _PlannedTensor(gguf_name, logical, np.float32, 4 * math.prod(logical), None, produce)
    if tensor_type == gguf.GGMLQuantizationType.F16:
        return _PlannedTensor(gguf_name, logical, np.float16, 2 * math.prod(logical), None, produce)
    byte_shape = gguf.quant_shape_to_byte_shape(logical, tensor_type)
    return _PlannedTensor(gguf_name, byte_shape, np.uint8, math.prod(byte_shape), tensor_type, produce)


def _loader(source: TensorSource, hf_name: str, qk_heads: int | None, tensor_type):
    def produce():
        import gguf
        import torch

        tensor = source.load(hf_name)
        if qk_heads is not None:
            tensor = interleave_qk(tensor, qk_heads)
        if tensor_type == gguf.GGMLQuantizationType.F16:
            return tensor.to(torch.float16).numpy()
        data = tensor.to(torch.float32).numpy()
        if tensor_type == gguf.GGMLQuantizationType.F32:
            return data
        return gguf.quants.quantize(data, tensor_type)

    return produce


def _rope_factors(shape: LlamaShape):
    """Llama-3.1-style rope scaling becomes a ``rope_freqs`` tensor, as llama.cpp expects."""
    import numpy as np

    scaling = shape.rope_scaling
    if scaling is None or scaling["rope_type"] != "llama3":
        return None
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (shape.rope_theta ** (np.arange(0, shape.head_dim, 2, dtype=np.float32) / shape.head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _add_hparams(writer, shape: LlamaShape) -> None:
    import gguf

    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(shape.norm_eps)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim != shape.hidden // shape.heads:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_vocab_size(shape.vocab)
    scaling = shape.rope_scaling
    if scaling is not None:
        if scaling["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))
        elif scaling["rope_type"] != "llama3":
            raise ExarError(f"rope scaling {scaling['rope_type']!r} is not supported by exar's GGUF writer (default, linear, llama3 are)")


# --- vocabulary -------------------------------------------------------------------------------

def read_vocab(hf_dir: Path, n_vocab: int, tokenizer) -> Vocab:
    """The tokenizer of an HF folder as llama.cpp wants it, padded to the embedding's row count."""
    hf_dir = Path(hf_dir)
    tokenizer_json = hf_dir / "tokenizer.json"
    model = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("model", {}) if tokenizer_json.is_file() else {}
    if (hf_dir / "tokenizer.model").is_file() and (not model or model.get("byte_fallback")):
        return _sentencepiece_vocab(hf_dir, n_vocab, tokenizer)
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        return _bpe_vocab(hf_dir, n_vocab, tokenizer)
    raise ExarError(f"{hf_dir}: tokenizer is neither SentencePiece (tokenizer.model) nor byte-level BPE (tokenizer.json)")


def _hf_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(hf_dir))
    except Exception as e:  # transformers raises many types for unreadable tokenizers
        raise ExarError(f"{hf_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def _sentencepiece_vocab(hf_dir: Path, n_vocab: int, tokenizer) -> Vocab:
    import gguf
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor()
    processor.LoadFromFile(str(hf_dir / "tokenizer.model"))
    if processor.vocab_size() > n_vocab:
        raise ExarError(f"{hf_dir}: tokenizer.model has {processor.vocab_size()} pieces, the embedding {n_vocab} rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-1000.0] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    for i in range(processor.vocab_size()):
        tokens[i] = processor.IdToPiece(i)
        scores[i] = processor.GetScore(i)
        types[i] = (gguf.TokenType.UNKNOWN if processor.IsUnknown(i) else gguf.TokenType.CONTROL if processor.IsControl(i)
                    else gguf.TokenType.UNUSED if processor.IsUnused(i) else gguf.TokenType.BYTE if processor.IsByte(i)
                    else gguf.TokenType.NORMAL)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if token_id >= processor.vocab_size() and token_id < n_vocab:
            tokens[token_id] = added.content if added.special else added.content.replace("\u2581", " ")
            scores[token_id] = -1000.0
            types[token_id] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    return Vocab("llama", "default", tokens, scores, [int(t) for t in types])


def _bpe_vocab(hf_dir: Path, n_vocab: int, tokenizer) -> Vocab:
    import gguf

    ids = tokenizer.encode(_BPE_CHECK_TEXT, add_special_tokens=False)
    check = hashlib.sha256(str(ids).encode()).hexdigest()
    pre = _BPE_PRE_BY_HASH.get(check)
    if pre is None:
        raise ExarError(f"{hf_dir}: BPE pre-tokenizer not recognised (hash {check[:12]}); "
                        f"exar knows {', '.join(sorted(set(_BPE_PRE_BY_HASH.values())))}")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ExarError(f"{hf_dir}: tokenizer has ids up to {max(vocab.values())}, the embedding {n_vocab} rows")
    added = tokenizer.added_tokens_decoder
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for text, token_id in vocab.items():
        tokens[token_id] = text
        if token_id in added:
            types[token_id] = int(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            types[token_id] = int(gguf.TokenType.NORMAL)
    return Vocab("gpt2", pre, tokens, None, types)


def _add_vocab(writer, hf_dir: Path, vocab: Vocab, tokenizer) -> None:
    import gguf

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    special = gguf.SpecialVocab(hf_dir, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    if vocab.model == "gpt2" and not special.merges:
        raise ExarError(f"{hf_dir}: the BPE tokenizer has no merges")
    # What the HF tokenizer really does decides the flags, so llama.cpp adds BOS exactly as often.
    probe = tokenizer("a").input_ids
    special.add_special_token = {
        "bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        "eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id],
    }
    special.chat_template = prompt_style(hf_dir).chat_template
    special.add_to_gguf(writer, quiet=True)
