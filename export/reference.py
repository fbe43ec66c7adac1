"""Transformers' logits for a few token sequences, computed one decoder layer at a time in fp32.

Loading a 7B model in fp32 takes 27 GB. The reference instead builds transformers' own
``LlamaDecoderLayer`` for one layer at a time, fills it with that layer's weights in fp32 (800 MB
at 7B), runs every sequence through it and lets it go; the embedding and the LM head are read in
rows. A PEFT LoRA adapter is applied as PEFT applies it, beside each adapted linear layer
(``x W^T + s (x A^T) B^T``), not merged. Mistral runs as Llama does in llama.cpp (full attention;
the same as its sliding window on sequences shorter than the window).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from exar.export.hfmodel import LlamaShape, TensorSource

_HEAD_ROWS = 16384  # LM-head rows turned to fp32 at a time


def _llama_config(shape: LlamaShape, source: TensorSource):
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": shape.rope_theta}
    if shape.rope_scaling is not None:
        rope = dict(shape.rope_scaling, rope_theta=shape.rope_theta)
    config = LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        rms_norm_eps=shape.norm_eps, vocab_size=shape.vocab, max_position_embeddings=shape.context,
        rope_parameters=rope, tie_word_embeddings=shape.tied,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in source,
        mlp_bias="model.layers.0.mlp.gate_proj.bias" in source,
    )
    config._attn_implementation = "sdpa"  # causal without a mask
    return config


def reference_logits(hf_dir: Path | str, sequences: Sequence[Sequence[int]], adapter=None, *, nf4_base: bool = False) -> list:
    """fp32 logits (positions x vocab, numpy) of each token sequence; ``adapter`` an ``exar.export.lora.Adapter``;
    ``nf4_base``: the blocks' linear layers as their NF4 round trip (the base QLoRA trained against)."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    hf_dir = Path(hf_dir)
    shape = LlamaShape.read(hf_dir)
    source = TensorSource(hf_dir)
    config = _llama_config(shape, source)
    modules = adapter.modules if adapter is not None else {}
    with torch.no_grad():
        embed = source.load("model.embed_tokens.weight")
        hidden = [embed[torch.tensor(list(ids))].to(torch.float32)[None] for ids in sequences]
        del embed
        rotary = LlamaRotaryEmbedding(config)
        positions = [torch.arange(h.shape[1])[None] for h in hidden]
        angles = [rotary(h, p) for h, p in zip(hidden, positions)]
        for index in range(shape.layers):
            layer = _layer(LlamaDecoderLayer, config, index, source, modules, nf4_base)
            hidden = [layer(h, position_ids=p, position_embeddings=a)
                      for h, p, a in zip(hidden, positions, angles)]
            del layer
        norm = LlamaRMSNorm(shape.hidden, eps=shape.norm_eps)
        norm.weight.copy_(source.load("model.norm.weight").to(torch.float32))
        hidden = [norm(h)[0] for h in hidden]
        return [_lm_head(h, source, modules.get("lm_head.weight")).numpy() for h in hidden]


def _layer(layer_class, config, index: int, source: TensorSource, modules: dict, nf4_base: bool):
    import torch

    from exar.export.merge import is_linear, nf4_roundtrip

    with torch.device("meta"):
        layer = layer_class(config, index)
    prefix = f"model.layers.{index}."
    state = {key: source.load(prefix + key).to(torch.float32) for key in layer.state_dict()}
    if nf4_base:
        state = {key: nf4_roundtrip(t) if is_linear(prefix + key) else t for key, t in state.items()}
    layer.load_state_dict(state, assign=True)
    for key, module in layer.named_modules():
        lora = modules.get(f"{prefix}{key}.weight")
        if lora is not None:
            module.register_forward_hook(_lora_hook(lora))
    return layer.eval()


def _lora_hook(lora):
    def hook(module, inputs, output):
        return output + (inputs[0] @ lora.a.T) @ lora.b.T * lora.scaling

    return hook


def _lm_head(hidden, source: TensorSource, lora=None):
    import torch

    name = "lm_head.weight" if "lm_head.weight" in source else "model.embed_tokens.weight"
    weight = source.load(name)
    parts = [hidden @ weight[row:row + _HEAD_ROWS].to(torch.float32).T for row in range(0, weight.shape[0], _HEAD_ROWS)]
    logits = torch.cat(parts, dim=-1)
    if lora is not None:
        logits = logits + (hidden @ lora.a.T) @ lora.b.T * lora.scaling
    return logits
