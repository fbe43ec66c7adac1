"""Variant names, the artifacts they load, their size, and the errors for what a run lacks."""

import json

import pytest

from exar.errors import ExarError
from exar.eval.variants import Variant, artifacts, model_bytes, parse_variant, parse_variants


def test_parse_every_kind():
    assert parse_variants("hf, hf-merged,base,gguf:q4_0,adapters:q8_0") == [
        Variant("hf", "transformers", "adapters"),
        Variant("hf-merged", "transformers", "merged"),
        Variant("base", "transformers", "base"),
        Variant("gguf:q4_0", "llama.cpp", "merged", "q4_0"),
        Variant("adapters:q8_0", "llama.cpp", "adapters", "q8_0"),
    ]
    assert parse_variant("gguf:q4_0").slug == "gguf-q4_0"
    assert parse_variant("gguf:f32").full_precision and not parse_variant("gguf:f16").full_precision


@pytest.mark.parametrize("text, message", [
    ("hf,onnx", "unknown variant 'onnx'"),
    ("gguf:", "unknown variant 'gguf:'"),
    ("hf,hf", "names hf twice"),
    (" , ", "--variants is empty"),
])
def test_bad_variant_lists(text, message):
    with pytest.raises(ExarError, match=message):
        parse_variants(text)


def test_artifacts_and_bytes_come_from_the_manifest(eval_run):
    rels = artifacts(eval_run, parse_variant("adapters:q4_0"))
    assert rels == ["gguf/base.q4_0.gguf", "gguf/answer.lora.gguf", "gguf/validator.lora.gguf", "gguf/exar.lora.gguf"]
    size = sum(eval_run.path(rel).stat().st_size for rel in rels)
    assert model_bytes(eval_run, parse_variant("adapters:q4_0"), rels) == size
    merged = artifacts(eval_run, parse_variant("gguf:f32"))
    assert merged == ["gguf/answer.f32.gguf", "gguf/validator.f32.gguf", "gguf/exar.f32.gguf"]
    hf = parse_variant("hf")
    adapters_bytes = sum(eval_run.entry(f"adapters/{r}")["bytes"] for r in ("answer", "validator", "exar"))
    assert model_bytes(eval_run, hf, artifacts(eval_run, hf)) == adapters_bytes + 1044992  # stories260K fp32


def test_a_variant_the_run_lacks_is_one_clear_error(eval_run):
    with pytest.raises(ExarError, match=r"variant gguf:q8_0: .*no q8_0 GGUF for merged mode \(exported: q4_0, f32\)"):
        artifacts(eval_run, parse_variant("gguf:q8_0"))
    manifest = json.loads(eval_run.manifest_path.read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["path"] != "hf/answer"]
    eval_run.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ExarError, match="variant hf-merged: the run .* has no hf/answer; run exar-export first"):
        artifacts(eval_run, parse_variant("hf-merged"))
