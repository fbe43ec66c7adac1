"""Our GGUF writer and llama.cpp's quantizer, checked against transformers and gguf.quants bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from exar.export.quantize import quantize_gguf, read_gguf_header
from exar.export.verify import LlamaCppModel, verify_gguf
from exar.export.writer import write_gguf

STORY = ", there was a little girl named Lily. She loved to play outside in the park."


def _greedy_hf(folder, text, n):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = tokenizer(text).input_ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0].tolist()
    return tokenizer, ids, out[len(ids):]


def _greedy_cpp(path, ids, n):
    with LlamaCppModel(path) as model:
        out = []
        for token in model.llm.generate(ids, top_k=1, temp=0.0):
            out.append(token)
            if len(out) == n:
                return out


def test_stories260k_greedy_continuation_matches_transformers_in_f32_and_q8_0(stories260k, tmp_path):
    tokenizer, ids, expected = _greedy_hf(stories260k, "Once upon a time", 30)
    assert tokenizer.decode(expected).startswith(STORY)
    f32 = tmp_path / "stories.f32.gguf"
    write_gguf(stories260k, f32, "f32", progress=False)
    assert _greedy_cpp(f32, ids, 30) == expected
    q8 = tmp_path / "stories.q8_0.gguf"
    summary = quantize_gguf(f32, q8, "q8_0", log_path=tmp_path / "llama.log")
    assert _greedy_cpp(q8, ids, 30) == expected
    # ffn_down rows are 172 wide, not a multiple of 32: llama.cpp keeps them in f16 and says so
    assert sorted(k["tensor"] for k in summary["kept"]) == [f"blk.{i}.ffn_down.weight" for i in range(5)]
    assert all("172" in k["reason"] and k["type"] == "f16" for k in summary["kept"])
    assert "llama_model_quantize" in (tmp_path / "llama.log").read_text()


def test_stories260k_verification_passes_with_measured_tolerances(stories260k, tmp_path):
    path = tmp_path / "stories.f32.gguf"
    write_gguf(stories260k, path, "f32", progress=False)
    result = verify_gguf(path, stories260k, outtype="f32")
    assert result["passed"] and result["texts"] == 8
    checks = {c["check"]: c for c in result["checks"]}
    assert checks["vocabulary entries differing from the HF tokenizer"]["value"] == 0
    assert checks["texts tokenized differently from the HF tokenizer"]["value"] == 0
    logits = checks["logits max rel diff vs transformers"]
    assert logits["value"] < 1e-5 and logits["limit"] == 1e-4  # measured 1.5e-6


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_quantized_tensors_bit_identical_to_gguf_numpy(tiny_llama, tmp_path, qtype):
    import gguf

    f32 = tmp_path / "tiny.f32.gguf"
    write_gguf(tiny_llama, f32, "f32", progress=False)
    reference = {t.name: np.array(t.data) for t in read_gguf_header(f32).tensors}
    for pure in (False, True):
        out = tmp_path / f"tiny.{qtype}.{pure}.gguf"
        summary = quantize_gguf(f32, out, qtype, pure=pure)
        ggml_type = gguf.GGMLQuantizationType[qtype.upper()]
        stored = {t.name: t for t in read_gguf_header(out).tensors}
        quantized = [n for n, t in stored.items() if t.tensor_type == ggml_type]
        for name in quantized:
            expected = gguf.quants.quantize(reference[name], ggml_type)
            assert np.array_equal(np.array(stored[name].data).reshape(expected.shape), expected), name
        matrices = [n for n, t in stored.items() if len(t.shape) == 2]
        assert len(matrices) == 2 * 7 + 2  # per block q, k, v, o, gate, up, down; embeddings; output
        if pure:
            assert sorted(quantized) == sorted(matrices) and summary["kept"] == []
        else:
            # llama.cpp keeps the output projection at q8_0 or above unless --pure
            kept = {k["tensor"]: k for k in summary["kept"]}
            assert set(quantized) == set(matrices) - set(kept)
            assert (qtype == "q8_0") == (kept == {})
            if kept:
                assert list(kept) == ["output.weight"] and "--pure" in kept["output.weight"]["reason"]


@pytest.mark.slow
def test_smollm2_f16_and_q4_0_still_answer_paris(smollm2_base, tmp_path):
    from transformers import AutoTokenizer

    from exar.basemodel import prompt_style

    folder = smollm2_base.path
    f16 = tmp_path / "smol.f16.gguf"
    summary = write_gguf(folder, f16, "f16", progress=False)
    assert summary["vocab"] == "gpt2/smollm (bpe)" and summary["n_vocab"] == 49152
    check = verify_gguf(f16, folder, outtype="f16", style=prompt_style(folder, "chat"))
    assert check["passed"] and not check["token_mismatches"], check
    q4 = tmp_path / "smol.q4_0.gguf"
    quantize_gguf(f16, q4, "q4_0")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    with LlamaCppModel(q4) as model:
        ids = model.llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert ids == tokenizer(prompt, add_special_tokens=False).input_ids
        out = []
        for token in model.llm.generate(ids, top_k=1, temp=0.0):
            if token == model.llm.token_eos() or len(out) == 16:
                break
            out.append(token)
        answer = model.llm.detokenize(out).decode()
    assert "Paris" in answer
