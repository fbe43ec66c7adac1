"""Merge and LoRA-GGUF equivalence, and the Meta consolidated round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exar.errors import ExarError
from exar.export.consolidated import meta_ffn_size, read_consolidated, write_consolidated
from exar.export.hfmodel import TensorSource
from exar.export.merge import merge_adapter, nf4_roundtrip
from exar.export.lora import read_adapter
from exar.export.reference import reference_logits
from exar.export.verify import LlamaCppModel
from export_builders import make_adapter

TEXT = "What is the capital of France? Paris is the capital."


def _transformers_logits(folder, ids, adapter=None):
    """fp32 logits of the whole model in transformers (+ PEFT, unmerged): what the export must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _ids(folder, text=TEXT):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))(text).input_ids


def test_merged_hf_logits_equal_peft_logits(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", seed=3)
    ids = _ids(tiny_llama)
    expected = _transformers_logits(tiny_llama, ids, adapter)
    assert np.abs(_transformers_logits(tiny_llama, ids) - expected).max() > 0.1  # the adapter really changes outputs
    stats = merge_adapter(tiny_llama, adapter, tmp_path / "merged", dtype="f32", progress=False)
    assert stats["modules"] == 2 * 7 and stats["largest_change"] > 0
    assert np.abs(_transformers_logits(tmp_path / "merged", ids) - expected).max() < 1e-4  # measured 2e-6
    assert (tmp_path / "merged" / "tokenizer.model").is_file()


def test_layer_by_layer_reference_equals_transformers_with_and_without_peft(tiny_llama, tmp_path):
    """The gate's reference (one decoder layer at a time, LoRA beside each layer) is transformers + PEFT."""
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", seed=5)
    ids = _ids(tiny_llama)
    for lora in (None, adapter):
        got = reference_logits(tiny_llama, [ids], read_adapter(lora, tiny_llama) if lora else None)[0]
        assert np.abs(got - _transformers_logits(tiny_llama, ids, lora)).max() < 1e-4


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
    ids = _ids(run.path("hf/exar"))
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
    params = dict(params)
    # Llama-2's ModelArgs(**params) takes no rope_theta (TypeError): its 10000 is implied
    multiplier = params.pop("ffn_dim_multiplier")
    assert summary["family"] == "llama2" and params == {
        "dim": 64, "multiple_of": 128, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "norm_eps": 1e-5, "vocab_size": 1024}
    assert meta_ffn_size(64, 128, multiplier) == 128  # Meta's FeedForward gives the model's intermediate size
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
