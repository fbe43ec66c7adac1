"""The Llama checkpoints people have: Llama-3 (byte-level BPE, BOS from a Sequence post-processor,
llama3 rope scaling), a Llama-2 folder saved by transformers 5 (tokenizer.json, no tokenizer.model)
and Mistral (MistralForCausalLM), each through `exar-train all`, `exar-export --quant q4_0` and
`exar-edge ask`, as a user runs them."""

from __future__ import annotations

import json

import pytest

from exar.errors import ExarError
from export_builders import build_llama3_style, build_mistral_style, build_transformers5_llama

TRAIN = ["--bits", "16", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--max-seq-len", "128",
         "--no-gradient-checkpointing", "--no-validation-loss", "--limit", "40", "--predict-limit", "4",
         "--max-new-tokens", "6", "--temperature", "0.7"]


def _exit_code(main, argv) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return exit_info.value.code


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return build_llama3_style(tmp_path_factory.mktemp("llama3") / "Llama-3.2-tiny")


@pytest.fixture(scope="module")
def transformers5(tmp_path_factory):
    return build_transformers5_llama(tmp_path_factory.mktemp("t5") / "Llama-2-tiny-t5")


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return build_mistral_style(tmp_path_factory.mktemp("mistral") / "Mistral-tiny")


def test_llama3_bos_is_read_from_the_tokenizer_itself(llama3):
    """Llama-3 adds BOS through a Sequence post-processor: BOS is added, once, in the chat layout too."""
    from transformers import AutoTokenizer

    from exar.basemodel import prompt_style
    from exar.prompts import render_answer

    tokenizer = AutoTokenizer.from_pretrained(str(llama3))
    style = prompt_style(llama3, "chat")
    assert style.add_bos and style.bos_token == "<|begin_of_text|>"
    ids = tokenizer(render_answer("What is the capital of France?", "", style)).input_ids
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_unknown_pre_tokenizer_is_one_line_naming_the_hash_and_the_override(llama3, tmp_path):
    """A byte-level BPE tokenizer whose check-text hash is not in llama.cpp's table (this one is trained here)."""
    import hashlib

    from transformers import AutoTokenizer

    from exar.export.pretokenizers import CHECK_TEXT
    from exar.export.writer import write_gguf

    tokenizer = AutoTokenizer.from_pretrained(str(llama3))
    chkhsh = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    with pytest.raises(ExarError) as error:
        write_gguf(llama3, tmp_path / "x.gguf", "f32", progress=False)
    message = str(error.value)
    assert "\n" not in message and chkhsh in message and "--pre-tokenizer NAME" in message
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(ExarError, match="unknown pre-tokenizer 'llama-4000'"):
        write_gguf(llama3, tmp_path / "x.gguf", "f32", progress=False, pre_tokenizer="llama-4000")


def test_llama3_gguf_carries_rope_freqs_eot_and_the_chat_template(llama3, tmp_path):
    from gguf import GGUFReader

    from exar.export.verify import verify_gguf
    from exar.export.writer import rope_factors, write_gguf
    from exar.export.hfmodel import LlamaShape

    out = tmp_path / "llama3.f32.gguf"
    summary = write_gguf(llama3, out, "f32", progress=False, pre_tokenizer="llama-bpe")
    assert summary["vocab"] == "gpt2/llama-bpe (bpe)"
    reader = GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    factors = rope_factors(LlamaShape.read(llama3)).numpy()
    assert list(tensors)[0] == "rope_freqs.weight" and (tensors["rope_freqs.weight"].data == factors).all()
    assert factors.min() == 1.0 and factors.max() == 32.0  # high frequencies kept, low ones scaled by the factor
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    tokenizer_config = json.loads((llama3 / "tokenizer_config.json").read_text())
    assert field("tokenizer.chat_template") == tokenizer_config["chat_template"]
    vocab = json.loads((llama3 / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    assert field("tokenizer.ggml.bos_token_id") == specials["<|begin_of_text|>"]
    assert field("tokenizer.ggml.eos_token_id") == specials["<|eot_id|>"]
    assert field("tokenizer.ggml.add_bos_token") is True
    check = verify_gguf(out, llama3, outtype="f32")
    assert check["passed"], check


@pytest.mark.slow  # three families, each trained, exported and asked: ~1-2 min each on 2 cores
@pytest.mark.parametrize("family", ["llama3", "transformers5", "mistral"])
def test_train_export_q4_0_and_ask(family, request, tmp_path, capsys):
    from exar.demo import demo_data
    from exar.edge.cli import main as edge
    from exar.export.cli import main as export
    from exar.train.cli import main as train

    base = request.getfixturevalue(family)
    run = tmp_path / "run"
    assert _exit_code(train, ["all", "--base", base, "--data", demo_data(), "--run", run, *TRAIN]) == 0
    extra = ["--pre-tokenizer", "llama-bpe"] if family == "llama3" else []
    assert _exit_code(export, ["--run", run, "--quant", "q4_0", "--threads", "2", *extra]) == 0
    manifest = {a["path"]: a for a in json.loads((run / "manifest.json").read_text())["artifacts"]}
    gated = [p for p, a in manifest.items() if a["kind"] in ("gguf-base", "gguf-merged", "gguf-lora", "hf-merged",
                                                            "consolidated")]
    assert {"gguf/base.q4_0.gguf", "gguf/exar.lora.gguf", "gguf/exar.q4_0.gguf", "hf/exar",
            "consolidated/exar"} <= set(gated)
    for rel in gated:
        gate = manifest[rel].get("gate")
        assert gate and gate["passed"] and all("limit" in c for c in gate["checks"]), (rel, gate)
    capsys.readouterr()
    assert _exit_code(edge, ["ask", "What is the capital of France?", "--run", run, "--quant", "q4_0", "--json",
                             "--max-new-tokens", "6", "--max-rounds", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quant"] == "q4_0" and result["rounds"] and result["decision"] in ("accepted", "best", "abstain")
