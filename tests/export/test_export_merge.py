"""Merge and LoRA-GGUF equivalence, and the Meta consolidated round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exar.errors import ExarError
from exar.export.consolidated import read_consolidated, write_consolidated
from exar.export.hfmodel import TensorSource
from exar.export.merge import merge_adapter, nf4_roundtrip
from exar.export.verify import LlamaCppModel, hf_logits, hf_reference
from export_builders import make_adapter

TEXT = "What is the capital of France? Paris is the capital."


def test_merged_hf_logits_equal_peft_logits(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", seed=3)
    tokenizer, peft_model = hf_reference(tiny_llama, adapter)
    ids = tokenizer(TEXT).input_ids
    expected = hf_logits(peft_model, ids)
    _, base_model = hf_reference(tiny_llama)
    assert np.abs(hf_logits(base_model, ids) - expected).max() > 0.1  # the adapter really changes outputs
    stats = merge_adapter(tiny_llama, adapter, tmp_path / "merged", dtype="f32", progress=False)
    assert stats["modules"] == 2 * 7 and stats["largest_change"] > 0
    _, merged = hf_reference(tmp_path / "merged")
    assert np.abs(hf_logits(merged, ids) - expected).max() < 1e-4  # measured 2e-6 (fp32 rounding order)
    assert (tmp_path / "merged" / "tokenizer.model").is_file()


def test_nf4_roundtrip_merges_into_the_quantized_base(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", seed=4, targets=["q_proj"])
    merge_adapter(tiny_llama, adapter, tmp_path / "w16", dtype="f32", progress=False)
    merge_adapter(tiny_llama, adapter, tmp_path / "nf4", merge_base="nf4-roundtrip", dtype="f32", progress=False)
    base, w16, nf4 = (TensorSource(p) for p in (tiny_llama, tmp_path / "w16", tmp_path / "nf4"))
    q = "model.layers.0.self_attn.q_proj.weight"
    up = "model.layers.1.mlp.up_proj.weight"
    delta = w16.load(q) - base.load(q)
    assert torch.allclose(nf4.load(q), nf4_roundtrip(base.load(q)) + delta, atol=1e-6)
    assert torch.equal(nf4.load(up), nf4_roundtrip(base.load(up)))           # every linear layer round-tripped
    assert 0 < (nf4.load(up) - base.load(up)).abs().max() < 0.1
    assert torch.equal(nf4.load("model.embed_tokens.weight"), base.load("model.embed_tokens.weight"))


def test_untrained_adapter_is_refused(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", spread=0.0)
    with pytest.raises(ExarError, match=r"does not change .* \(lora_B is zero"):
        merge_adapter(tiny_llama, adapter, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow  # shares the exported_tiny_run fixture: ~50-120 s once per session
def test_base_plus_lora_gguf_gives_merged_logits(exported_tiny_run):
    run, _ = exported_tiny_run
    tokenizer, _ = hf_reference(run.path("hf/exar"))
    ids = tokenizer(TEXT).input_ids
    with LlamaCppModel(run.path("gguf/base.f32.gguf"), run.path("gguf/exar.lora.gguf")) as with_lora:
        lora_logits = with_lora.logits(ids)
    with LlamaCppModel(run.path("gguf/exar.f32.gguf")) as merged:
        merged_logits = merged.logits(ids)
    with LlamaCppModel(run.path("gguf/base.f32.gguf")) as base:
        base_logits = base.logits(ids)
    assert np.abs(base_logits - merged_logits).max() > 0.1
    assert np.abs(lora_logits - merged_logits).max() < 1e-4  # measured 6e-6 (stories260K), 1e-6 here


@pytest.mark.parametrize("shards", [1, 2])
def test_consolidated_round_trip_gqa(tiny_llama, tmp_path, shards):
    out = tmp_path / "consolidated"
    summary = write_consolidated(tiny_llama, out, shards=shards, progress=False)
    files = sorted(p.name for p in out.glob("*.pth"))
    assert files == [f"consolidated.{i:02d}.pth" for i in range(shards)]
    params = json.loads((out / "params.json").read_text())
    assert params == summary["params"]
    assert {k: params[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta")} == {
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 1024, "norm_eps": 1e-5, "rope_theta": 10000.0}
    first = torch.load(out / files[0], weights_only=True)
    assert first["layers.0.attention.wk.weight"].shape == (2 * 16 // shards, 64)  # GQA: 2 kv heads of 16
    assert first["layers.0.attention.wo.weight"].shape == (64, 64 // shards)
    config, state = read_consolidated(out)
    source = TensorSource(tiny_llama)
    assert set(state) == set(source.names())
    assert all(torch.equal(state[n], source.load(n)) for n in source.names())
    original = json.loads((tiny_llama / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "head_dim"):
        assert config[key] == original[key], key
    assert (out / "tokenizer.model").read_bytes() == (tiny_llama / "tokenizer.model").read_bytes()


def test_consolidated_round_trip_tied_real_model(stories260k, tmp_path):
    write_consolidated(stories260k, tmp_path / "c", progress=False)
    config, state = read_consolidated(tmp_path / "c")
    source = TensorSource(stories260k)
    assert config["tie_word_embeddings"] is True and config["intermediate_size"] == 172
    assert all(torch.equal(state[n], source.load(n)) for n in source.names() if n != "lm_head.weight")
