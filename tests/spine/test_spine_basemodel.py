"""Base models: HF folders, GGUF import of the built-in SmolLM2, refusal of non-Llama bases."""

import json
import shutil
from pathlib import Path

import pytest

from exar.basemodel import fingerprint, prompt_style, resolve_base
from exar.errors import ExarError
from exar.prompts import render_answer


def test_hf_folder_base(tiny_llama):
    base = resolve_base(tiny_llama)
    assert base.name == tiny_llama.name and base.fingerprint == fingerprint(tiny_llama)
    assert len(base.fingerprint) == 64


def test_non_llama_folder_is_refused(tiny_llama, tmp_path):
    other = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama, other)
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExarError, match="architecture GPT2LMHeadModel is not supported"):
        resolve_base(other)


def test_unknown_base_spec(tmp_path):
    with pytest.raises(ExarError, match="'llama-9000' does not exist: BASE is a local Hugging Face folder, a .gguf "
                                        "file, or a built-in name .*; exar never downloads a base"):
        resolve_base("llama-9000")
    with pytest.raises(ExarError, match="no such GGUF file"):
        resolve_base(tmp_path / "missing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExarError, match="no config.json"):
        resolve_base(tmp_path / "empty")


def test_corrupted_gguf_is_refused(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ExarError, match="broken.gguf"):
        resolve_base(bad, where=tmp_path)
    assert not (tmp_path / "base" / "broken").exists()


@pytest.mark.slow
def test_builtin_smollm2_imports_once_and_answers_paris(smollm2_base):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = smollm2_base.path
    model = LlamaForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert "quantization_config" not in json.loads((Path(folder) / "config.json").read_text())  # plain fp32 now
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer

    style = prompt_style(folder, "chat")
    assert style.eos_token == "<|im_end|>" and "<|im_start|>" in style.special_tokens
    assert not style.add_bos  # SmolLM2 adds no BOS: its template's leading <|im_start|> must stay
    assert render_answer("Capital of France?", style=style).startswith("<|im_start|>system\n")
    # a second resolve reuses the imported folder
    again = resolve_base("smollm2-135m-instruct", where=__import__("pathlib").Path(folder).parents[1])
    assert again.fingerprint == smollm2_base.fingerprint


def test_prompt_style_knows_whether_the_tokenizer_adds_bos(tiny_llama):
    from transformers import AutoTokenizer

    style = prompt_style(tiny_llama, "chat")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    assert style.add_bos and tokenizer("x").input_ids[0] == tokenizer.bos_token_id
    assert (style.bos_token, style.eos_token) == ("<s>", "</s>")


def test_gguf_import_is_reused_only_for_the_same_bytes(tmp_path):
    """The reuse check compares the source's sha256, hashed only when its inode/mtime/size changed."""
    from exar.basemodel import IMPORT_RECORD, IMPORT_VERSION, import_gguf
    from exar.rundir import sha256_file, stat_fingerprint

    source, dest = tmp_path / "m.gguf", tmp_path / "base" / "m"
    source.write_bytes(b"GGUF" + b"\x01" * 60)  # not a loadable GGUF: a re-import would fail on it
    dest.mkdir(parents=True)
    record = {"version": IMPORT_VERSION, "source_name": "m.gguf", "source_bytes": 64,
              "source_sha256": sha256_file(source), "source_stat": stat_fingerprint(source)}
    (dest / IMPORT_RECORD).write_text(json.dumps(record))
    assert import_gguf(source, dest) == dest

    source.write_bytes(b"GGUF" + b"\x02" * 60)  # same size, other bytes: imported anew (and refused here)
    with pytest.raises(ExarError, match="m.gguf: not a readable GGUF file"):
        import_gguf(source, dest)

    source.write_bytes(b"GGUF" + b"\x01" * 60)  # the same bytes again, another mtime: reused, stat recorded anew
    assert import_gguf(source, dest) == dest
    assert json.loads((dest / IMPORT_RECORD).read_text())["source_stat"] == stat_fingerprint(source)
