"""Meta's own loaders accept exar's consolidated checkpoints, and compute what transformers computes.

A small reimplementation of Meta's reference loading: ``ModelArgs`` with the exact field set of
meta-llama/llama (Llama-2) and meta-llama/llama3 ``llama/model.py`` (a dataclass, so an unknown
key in params.json raises TypeError as ``ModelArgs(max_seq_len=..., max_batch_size=..., **params)``
does in Meta's ``Llama.build``), module shapes per model-parallel rank derived from those args as
Meta's layers derive them, and the forward pass of Meta's ``Transformer`` (complex rotary on
interleaved pairs, fairscale's parallel layers computed rank by rank and gathered or summed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from exar.export.consolidated import write_consolidated
from export_builders import _save_random


@dataclass
class Llama2ModelArgs:  # meta-llama/llama llama/model.py
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    max_batch_size: int = 32
    max_seq_len: int = 2048


@dataclass
class Llama3ModelArgs:  # meta-llama/llama3 llama/model.py
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000
    max_batch_size: int = 32
    max_seq_len: int = 2048


def _ffn_hidden(args) -> int:  # Meta's FeedForward(hidden_dim=4 * dim, ...)
    hidden = int(2 * 4 * args.dim / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    return args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)


def _rank_shapes(args, shards: int, vocab_parallel: bool) -> dict[str, tuple]:
    """Each parameter's shape on one model-parallel rank, as Meta's Transformer(args) creates it."""
    head_dim, kv = args.dim // args.n_heads, args.n_kv_heads or args.n_heads
    ffn = _ffn_hidden(args)
    shapes = {"tok_embeddings.weight": (args.vocab_size // shards, args.dim) if vocab_parallel
              else (args.vocab_size, args.dim // shards),
              "norm.weight": (args.dim,), "output.weight": (args.vocab_size // shards, args.dim)}
    for i in range(args.n_layers):
        shapes.update({
            f"layers.{i}.attention.wq.weight": (args.n_heads * head_dim // shards, args.dim),
            f"layers.{i}.attention.wk.weight": (kv * head_dim // shards, args.dim),
            f"layers.{i}.attention.wv.weight": (kv * head_dim // shards, args.dim),
            f"layers.{i}.attention.wo.weight": (args.dim, args.n_heads * head_dim // shards),
            f"layers.{i}.feed_forward.w1.weight": (ffn // shards, args.dim),
            f"layers.{i}.feed_forward.w2.weight": (args.dim, ffn // shards),
            f"layers.{i}.feed_forward.w3.weight": (ffn // shards, args.dim),
            f"layers.{i}.attention_norm.weight": (args.dim,), f"layers.{i}.ffn_norm.weight": (args.dim,)})
    return shapes


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotary(x, freqs_cis):
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis[None, :, None, :]).flatten(3)


def meta_forward(args, ranks: list[dict], tokens: torch.Tensor, vocab_parallel: bool, theta: float) -> torch.Tensor:
    """Meta's Transformer.forward(tokens, 0), each rank's slice computed on its own, then gathered / all-reduced."""
    n = len(ranks)
    head_dim, kv = args.dim // args.n_heads, args.n_kv_heads or args.n_heads
    local_heads, local_kv = args.n_heads // n, kv // n
    seq = tokens.shape[1]
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    freqs_cis = torch.polar(torch.ones(seq, head_dim // 2), torch.outer(torch.arange(seq).float(), freqs))
    mask = torch.triu(torch.full((seq, seq), float("-inf")), diagonal=1)
    if vocab_parallel:  # VocabParallelEmbedding: rows per rank, other ranks' ids give zeros, summed
        rows = args.vocab_size // n
        h = sum(torch.where(((tokens >= r * rows) & (tokens < (r + 1) * rows))[..., None],
                            F.embedding((tokens - r * rows).clamp(0, rows - 1), w["tok_embeddings.weight"]), 0.0)
                for r, w in enumerate(ranks))
    else:  # ParallelEmbedding: columns per rank, gathered
        h = torch.cat([F.embedding(tokens, w["tok_embeddings.weight"]) for w in ranks], dim=-1)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        x = _rms(h, ranks[0][p + "attention_norm.weight"], args.norm_eps)
        out = 0
        for w in ranks:  # ColumnParallel wq/wk/wv (local heads), RowParallel wo: partial sums all-reduced
            q = (x @ w[p + "attention.wq.weight"].T).view(1, seq, local_heads, head_dim)
            k = (x @ w[p + "attention.wk.weight"].T).view(1, seq, local_kv, head_dim)
            v = (x @ w[p + "attention.wv.weight"].T).view(1, seq, local_kv, head_dim)
            q, k = _rotary(q, freqs_cis), _rotary(k, freqs_cis)
            k = k.repeat_interleave(local_heads // local_kv, dim=2)
            v = v.repeat_interleave(local_heads // local_kv, dim=2)
            scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3) / math.sqrt(head_dim) + mask
            att = (F.softmax(scores.float(), dim=-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(1, seq, -1)
            out = out + att @ w[p + "attention.wo.weight"].T
        h = h + out
        x = _rms(h, ranks[0][p + "ffn_norm.weight"], args.norm_eps)
        h = h + sum((F.silu(x @ w[p + "feed_forward.w1.weight"].T) * (x @ w[p + "feed_forward.w3.weight"].T))
                    @ w[p + "feed_forward.w2.weight"].T for w in ranks)
    h = _rms(h, ranks[0]["norm.weight"], args.norm_eps)
    return torch.cat([h @ w["output.weight"].T for w in ranks], dim=-1)  # ColumnParallel, gather_output=True


def _llama3_folder(folder):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    return _save_random(folder, config, seed=3)


@pytest.mark.parametrize("family, shards", [("llama2", 1), ("llama2", 2), ("llama3", 2)])
def test_meta_loader_accepts_consolidated_and_matches_transformers(family, shards, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir = tiny_llama if family == "llama2" else _llama3_folder(tmp_path / "hf")
    summary = write_consolidated(hf_dir, tmp_path / "meta", shards=shards, progress=False)
    assert summary["family"] == family
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    model_args = {"llama2": Llama2ModelArgs, "llama3": Llama3ModelArgs}[family]
    args = model_args(max_seq_len=64, max_batch_size=1, **params)  # Meta's Llama.build; unknown keys raise
    if family == "llama2":
        with pytest.raises(TypeError):  # what exar used to write, and Llama-2's loader refuses
            model_args(**params, rope_theta=10000.0)
    ranks = [torch.load(tmp_path / "meta" / f"consolidated.{r:02d}.pth", map_location="cpu", weights_only=True)
             for r in range(shards)]
    expected = _rank_shapes(args, shards, vocab_parallel=family == "llama3")
    for rank in ranks:  # Meta loads with strict=False: a misnamed key would be silently skipped, so check names too
        assert {k: tuple(v.shape) for k, v in rank.items()} == expected

    tokens = torch.tensor([[1, 17, 300, 5, 999, 42, 7, 512, 1023, 64, 3, 250]])
    theta = getattr(args, "rope_theta", 10000.0)  # Llama-2's precompute_freqs_cis default
    with torch.no_grad():
        meta = meta_forward(args, ranks, tokens, family == "llama3", theta)[0]
        hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)(tokens).logits[0]
    assert hf.abs().max() > 1.0  # logits that are not all alike
    assert (meta - hf).abs().max() < 1e-4
