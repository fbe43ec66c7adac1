"""exar's GGUF against llama.cpp's own convert_hf_to_gguf.py, on the same folders, and llama.cpp's
tokenizer fixtures through exar's files.

Needs the llama-cpp-python source distribution of the installed version (see llamacpp_ref);
without it every test here skips and says how to get it. What each comparison allows to differ:
naming metadata (general.name and the like, which the converter takes from the folder name), and
for a Llama-2 folder without tokenizer.model the token scores, which exar sets from the merge ranks
on purpose (exar.export.vocab): the converter's -1000 everywhere makes llama.cpp split words the HF
tokenizer keeps whole, which the last test shows.
"""

from __future__ import annotations

import ast
import hashlib
import re

import pytest

import llamacpp_ref as ref
from exar.export.writer import write_gguf
from export_builders import build_llama3_style, build_mistral_style, build_on_tokenizer, build_transformers5_llama
from tiny import LLAMA2_TOKENIZER

SCORES = "tokenizer.ggml.scores"


@pytest.fixture(scope="session")
def llama_cpp_dir(tmp_path_factory):
    sdist, why = ref.find_sdist()
    if sdist is None:
        pytest.skip(f"llama.cpp conformance needs the llama-cpp-python sdist: {why}")
    return ref.unpack(sdist, tmp_path_factory.mktemp("llama-cpp-sdist"))


@pytest.fixture(scope="session")
def folders(llama_cpp_dir, tiny_llama, stories260k, tmp_path_factory):
    """Every folder variant, with the outtype each is compared in."""
    root = tmp_path_factory.mktemp("conformance")
    vocab_bpe = llama_cpp_dir / "models" / "ggml-vocab-llama-bpe.gguf"
    found = {
        "llama2-sentencepiece-gqa-untied": (tiny_llama, "f16"),
        "llama2-tokenizer-json-only": (build_transformers5_llama(root / "t5"), "f16"),
        "stories260k-tied-f32": (stories260k, "f32"),
        "llama3-bpe-rope-scaling-tied": (build_llama3_style(root / "llama3", vocab_bpe, hidden=64), "f16"),
        "llama3-bpe-no-scaling-untied": (build_llama3_style(root / "llama3u", vocab_bpe, rope=None, tie=False, seed=1), "f16"),
        "mistral": (build_mistral_style(root / "mistral"), "f16"),
    }
    if (LLAMA2_TOKENIZER / "tokenizer.model").is_file():
        found["llama2-real-tokenizer"] = (build_on_tokenizer(root / "l2", LLAMA2_TOKENIZER), "f16")
        found["llama2-real-tokenizer-json-only"] = (build_on_tokenizer(root / "l2t5", LLAMA2_TOKENIZER,
                                                                       sentencepiece=False), "f16")
    return found


@pytest.fixture(scope="session")
def converted(llama_cpp_dir, folders, tmp_path_factory):
    """(exar's GGUF, convert_hf_to_gguf.py's GGUF) per folder, the converter run once for all."""
    out = tmp_path_factory.mktemp("converted")
    jobs, pairs = [], {}
    for name, (folder, outtype) in folders.items():
        ours, theirs = out / f"{name}.exar.gguf", out / f"{name}.llama-cpp.gguf"
        write_gguf(folder, ours, outtype, progress=False)
        jobs.append((folder, theirs, outtype))
        pairs[name] = (ours, theirs)
    ref.convert_hf(llama_cpp_dir, jobs)
    return pairs


@pytest.mark.slow
def test_pre_tokenizer_table_is_llama_cpps(llama_cpp_dir):
    from exar.export.pretokenizers import BY_HASH, CHECK_TEXT

    source = (llama_cpp_dir / "conversion" / "base.py").read_text(encoding="utf-8")
    literal = re.search(r"^\s*chktxt = (.+)$", source, re.M).group(1)
    assert ast.literal_eval(literal) == CHECK_TEXT
    assert BY_HASH == ref.pre_tokenizer_table(llama_cpp_dir)


@pytest.mark.slow
def test_real_llama3_vocabulary_is_detected_as_llama_bpe(folders):
    from transformers import AutoTokenizer

    from exar.export.pretokenizers import CHECK_TEXT
    from exar.export.vocab import pre_tokenizer

    folder = folders["llama3-bpe-rope-scaling-tied"][0]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.encode(CHECK_TEXT)[0] == 128000  # BOS is part of what llama.cpp hashes
    assert hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest().startswith("0ef9807a")
    assert pre_tokenizer(tokenizer, folder) == "llama-bpe"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama2-sentencepiece-gqa-untied", "llama2-tokenizer-json-only", "stories260k-tied-f32",
                                  "llama3-bpe-rope-scaling-tied", "llama3-bpe-no-scaling-untied", "mistral",
                                  "llama2-real-tokenizer", "llama2-real-tokenizer-json-only"])
def test_tensors_and_metadata_equal_convert_hf_to_gguf(converted, name):
    if name not in converted:
        pytest.skip(f"{LLAMA2_TOKENIZER} is absent (it comes with ../shared)")
    ours, theirs = converted[name]
    diff = ref.differences(ours, theirs)
    assert diff["tensors"] == {} and diff["tensor_order_equal"], diff["tensors"]
    allowed = {SCORES} if "json-only" in name else set()
    assert set(diff["metadata"]) <= allowed, diff["metadata"]


@pytest.mark.slow
@pytest.mark.parametrize("vocab", ["llama-spm", "llama-bpe"])
def test_llama_cpp_tokenizer_fixtures_through_exar_gguf(llama_cpp_dir, folders, converted, vocab):
    """llama.cpp's ggml-vocab-<vocab>.gguf.inp strings, tokenized through exar's GGUF, give the .out ids."""
    from exar.export.verify import LlamaCppModel

    name = {"llama-spm": "llama2-real-tokenizer", "llama-bpe": "llama3-bpe-rope-scaling-tied"}[vocab]
    if name not in converted:
        pytest.skip(f"{LLAMA2_TOKENIZER} is absent (it comes with ../shared)")
    _, texts, expected = ref.vocab_fixture(llama_cpp_dir, vocab)
    with LlamaCppModel(converted[name][0]) as model:
        got = [model.llm.tokenize(text.encode(), add_bos=False, special=False) for text in texts]
    assert len(texts) > 30
    assert [i for i, (a, b) in enumerate(zip(got, expected)) if a != b] == []


@pytest.mark.slow
def test_tokenizer_json_only_scores_keep_hf_tokenization(folders, converted):
    """Where exar differs from the converter on purpose: with the converter's scores llama.cpp tokenizes
    a Llama-2 tokenizer.json differently from HF; with exar's it does not."""
    from transformers import AutoTokenizer

    from exar.export.verify import LlamaCppModel, check_texts

    name = "llama2-real-tokenizer-json-only"
    if name not in converted:
        pytest.skip(f"{LLAMA2_TOKENIZER} is absent (it comes with ../shared)")
    tokenizer = AutoTokenizer.from_pretrained(str(folders[name][0]))
    texts = check_texts()
    expected = [tokenizer(text).input_ids for text in texts]
    ours, theirs = converted[name]
    with LlamaCppModel(ours) as model:
        assert [model.tokenize(t) for t in texts] == expected
    with LlamaCppModel(theirs) as model:
        assert sum(model.tokenize(t) != e for t, e in zip(texts, expected)) > 0
