"""export_run and the exar-export command: artifacts, manifest, skipping, and one-line errors on bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from exar.constants import ROLES
from exar.errors import ExarError
from exar.export import layout
from exar.export.cli import main
from exar.export.pipeline import ExportOptions, export_run
from exar.export.quantize import quantize_gguf
from exar.export.writer import write_gguf
from export_builders import make_adapter, make_run


def _cli(capsys, *args):
    capsys.readouterr()  # drop what building the fixtures printed
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.slow  # shares the exported_tiny_run fixture: ~50-120 s once per session
def test_every_artifact_is_recorded_and_verified(exported_tiny_run):
    run, summary = exported_tiny_run
    by_path = {e["path"]: e for e in run.artifacts}
    expected = {layout.gguf_rel("base", v): "gguf-base" for v in ("f32", "q4_0", "q8_0")}
    for role in ROLES:
        expected.update({layout.hf_rel(role): "hf-merged", layout.consolidated_rel(role): "consolidated",
                         layout.lora_rel(role): "gguf-lora"})
        expected.update({layout.gguf_rel(role, v): "gguf-merged" for v in ("f32", "q4_0", "q8_0")})
        expected.update({layout.modelfile_rel(role, q, a): "modelfile" for q in ("q4_0", "q8_0") for a in (True, False)})
    expected[layout.LOG_REL] = "log"
    assert {p: by_path[p]["kind"] for p in expected} == expected
    for rel, entry in by_path.items():
        if entry["kind"] in ("log", "adapter"):  # written by the train stage / llama.cpp's log: no gate
            continue
        gate = entry["gate"]
        assert gate["passed"] and all(c["passed"] and "limit" in c for c in gate["checks"]), rel
        checks = {c["check"]: c["value"] for c in gate["checks"]}
        if rel.endswith((".f32.gguf", ".lora.gguf")):
            assert checks["vocabulary entries differing from the HF tokenizer"] == 0, rel
            assert checks["texts tokenized differently from the HF tokenizer"] == 0, rel
            assert checks["logits max rel diff vs transformers"] < 1e-5  # measured ~1e-6; limit 1e-4
        elif rel.endswith((".q4_0.gguf", ".q8_0.gguf")):
            assert gate["tokens"] == 259
            if ".q8_0." in rel:
                assert gate["mean_kl"] < 1e-3 and gate["top1_agreement"] > 0.85  # measured 1e-4, 92-96 %
            else:
                assert gate["mean_kl"] < 0.05 and gate["top1_agreement"] > 0.4   # measured 0.013-0.017, 52-62 %
        elif entry["kind"] == "hf-merged":
            assert checks["logits max rel diff vs the PEFT model"] < 1e-5  # f32; limit 1e-4
        elif entry["kind"] == "consolidated":
            assert checks["tensors differing from the HF weights"] == 0 and checks["tensors missing"] == 0
    assert by_path["gguf/exar.q4_0.gguf"]["made_from"] == ["gguf/exar.f32.gguf"]
    assert by_path["gguf/base.q4_0.gguf"]["kept"][0]["tensor"] == "output.weight"
    assert run.settings["export"]["quants"] == ["q4_0", "q8_0"] and summary["roles"] == list(ROLES)


@pytest.mark.slow  # shares the exported_tiny_run fixture: ~50-120 s once per session
def test_modelfile_uses_exar_layout(exported_tiny_run):
    run, _ = exported_tiny_run
    text = run.path(layout.modelfile_rel("validator", "q4_0", adapters=True)).read_text()
    assert text.startswith("FROM ./base.q4_0.gguf\nADAPTER ./validator.lora.gguf\n")
    assert 'TEMPLATE """### Context:\n{{ .System }}\n### Instruction:\nValidate the response' in text
    assert '### Input:\n{{ .Prompt }}\n\n### Response:\n"""' in text
    assert 'PARAMETER stop "### Response:"' in text and 'PARAMETER stop "</s>"' in text


@pytest.mark.slow  # shares the exported_tiny_run fixture: ~50-120 s once per session
def test_second_export_skips_unchanged_and_redoes_changed(exported_tiny_run):
    run, _ = exported_tiny_run
    lines = []
    export_run(run, ExportOptions(quants=("q4_0", "q8_0"), mode="both", outtype="f32", ollama=True, threads=2),
               echo=lines.append)
    assert lines and all(line.startswith("unchanged: ") for line in lines)
    before = run.entry("gguf/base.q4_0.gguf")["sha256"]
    lines.clear()
    export_run(run, ExportOptions(quants=("q4_0",), mode="adapters", outtype="f32", pure=True, threads=2), echo=lines.append)
    assert "writing gguf/base.q4_0.gguf" in lines and "unchanged: gguf/base.f32.gguf" in lines
    entry = run.entry("gguf/base.q4_0.gguf")
    assert entry["sha256"] != before and entry["pure"] is True and entry["kept"] == []


def test_cli_exports_and_prints_json(tiny_llama, tmp_path, capsys):
    run = make_run(tmp_path / "run", tiny_llama, roles=("answer",), targets=["q_proj", "v_proj"])
    code, out, err = _cli(capsys, "--run", str(run.root), "--quant", "q8_0", "--mode", "adapters", "--outtype", "f32",
                          "--threads", "2", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["gates"]["gguf/answer.lora.gguf"]["passed"] is True
    assert run.path("gguf/base.q8_0.gguf").is_file() and not run.path("hf").exists()
    assert "writing gguf/answer.lora.gguf" in err and "llama_model_quantize" not in err  # native log went to the file
    assert "llama_model_quantize" in run.path(layout.LOG_REL).read_text()


@pytest.mark.parametrize("quant, message", [
    ("q9_9", "unknown quant type 'q9_9'; llama.cpp offers"),
    ("iq2_xs", "quant type iq2_xs needs an importance matrix"),
])
def test_cli_refuses_bad_quant_type(tiny_run, capsys, quant, message):
    code, _, err = _cli(capsys, "--run", str(tiny_run.root), "--quant", quant)
    assert code == 1 and err.startswith(f"error: {message}") and err.count("\n") == 1


def test_too_little_disk_stops_before_writing(tiny_llama, tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path / "run", tiny_llama, roles=("answer",), targets=["q_proj"])
    monkeypatch.setattr("exar.export.pipeline.free_bytes", lambda path: 10_000)
    code, _, err = _cli(capsys, "--run", str(run.root), "--quant", "q4_0")
    lines = err.splitlines()  # what the export needs is said first, then the one-line error
    assert code == 1 and len(lines) == 2 and lines[0].startswith("disk: this export writes about ")
    assert lines[1].startswith("error: ") and "not enough free disk for this export" in lines[1]
    assert not run.path("gguf").exists() and not run.path("hf").exists()


def test_adapter_made_on_another_base_is_refused(tiny_llama, tmp_path, capsys):
    from tiny import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", hidden=32, intermediate=64)
    run = make_run(tmp_path / "run", tiny_llama, roles=("answer",), targets=["q_proj"])
    shutil.rmtree(run.path("adapters/answer"))
    make_adapter(other, run.path("adapters/answer"), targets=["q_proj"])
    config_path = run.path("adapters/answer/adapter_config.json")
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tiny_llama)  # the name would pass: the shapes give it away
    config_path.write_text(json.dumps(config))
    run.record("adapters/answer", "adapter", role="answer")
    code, _, err = _cli(capsys, "--run", str(run.root), "--mode", "adapters", "--outtype", "f32")
    assert code == 1 and "adapter made on another base" in err and "64x64" in err and err.count("\n") == 1
    assert not run.path(layout.lora_rel("answer")).exists()
    config["base_model_name_or_path"] = "/elsewhere/Llama-2-7b-hf"
    config_path.write_text(json.dumps(config))
    run.record("adapters/answer", "adapter", role="answer")
    code, _, err = _cli(capsys, "--run", str(run.root), "--mode", "adapters", "--outtype", "f32")
    assert "adapter made on another base (/elsewhere/Llama-2-7b-hf)" in err


def test_truncated_safetensors_and_gguf_are_refused(tiny_llama, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ExarError, match=r"model.safetensors: truncated or not a safetensors file"):
        write_gguf(broken, tmp_path / "out.gguf", "f32", progress=False)
    assert list(tmp_path.glob("out.gguf*")) == []

    good = tmp_path / "good.gguf"
    write_gguf(tiny_llama, good, "f32", progress=False)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-4096])
    with pytest.raises(ExarError, match=r"cut.gguf: not a readable GGUF file"):
        quantize_gguf(cut, tmp_path / "cut.q4_0.gguf", "q4_0")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ExarError, match=r"garbage.gguf: not a readable GGUF file"):
        quantize_gguf(garbage, tmp_path / "garbage.q4_0.gguf", "q4_0")
    assert list(tmp_path.glob("*.q4_0.gguf*")) == []


def test_non_llama_architecture_is_refused(tiny_llama, tmp_path):
    other = tmp_path / "qwen2"
    shutil.copytree(tiny_llama, other)
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExarError, match="architecture Qwen2ForCausalLM is not supported"):
        write_gguf(other, tmp_path / "m.gguf", "f16", progress=False)
    assert not (tmp_path / "m.gguf").exists()
