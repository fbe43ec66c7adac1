"""The export gate fails on a damaged file: exit != 0, the file recorded as failed, edge and eval refuse it,
and a rerun redoes it. Its limits are llama.cpp's published figures."""

from __future__ import annotations

import pytest

from exar.errors import ExarError
from exar.export import gate
from exar.export.cli import main
from exar.rundir import Run
from export_builders import make_run

EXPORT = ["--mode", "adapters", "--quant", "q8_0", "--outtype", "f32", "--threads", "2"]


def _scramble_embeddings(path) -> None:
    """Damage a GGUF the way a bad conversion would: every token reads another token's embedding row."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    embedding.data[:] = embedding.data[::-1].copy()
    reader.data.flush()


@pytest.mark.parametrize("damaged, check", [
    ("gguf/base.f32.gguf", "logits max rel diff vs transformers"),
    ("gguf/base.q8_0.gguf", "mean KL divergence vs unquantized"),
])
def test_a_damaged_file_fails_the_gate_is_recorded_and_refused(tiny_llama, tmp_path, capsys, monkeypatch, damaged, check):
    import exar.export.quantize
    import exar.export.writer
    from exar.edge.runtime import find_models

    run = make_run(tmp_path / "run", tiny_llama, roles=("answer", "validator", "exar"), targets=["q_proj"])
    real = exar.export.writer.write_gguf if damaged.endswith(".f32.gguf") else exar.export.quantize.quantize_gguf

    def damaging(source, out, *args, **kwargs):
        summary = real(source, out, *args, **kwargs)
        if str(out).startswith(str(run.path(damaged))):  # the temporary file that becomes ``damaged``
            _scramble_embeddings(out)
        return summary

    target = "write_gguf" if damaged.endswith(".f32.gguf") else "quantize_gguf"
    monkeypatch.setattr(exar.export.writer if target == "write_gguf" else exar.export.quantize, target, damaging)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--run", str(run.root), *EXPORT])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {run.path(damaged)}: failed the export gate: {check} ") and "recorded as failed" in last

    entry = Run(run.root).entry(damaged)
    assert entry["gate"]["passed"] is False
    failed = [c for c in entry["gate"]["checks"] if not c["passed"]]
    assert [c["check"] for c in failed][:1] == [check] and failed[0]["value"] > 10 * failed[0]["limit"]
    with pytest.raises(ExarError, match=r"failed the export gate"):  # find_models: what exar-edge and exar-eval open
        find_models(Run(run.root), mode="adapters", quant=damaged.split(".")[1])

    monkeypatch.undo()
    monkeypatch.setenv("EXAR_MODELS", str(tmp_path / "models"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--run", str(run.root), *EXPORT])
    assert exit_info.value.code == 0
    assert f"writing {damaged}" in capsys.readouterr().err  # a failed file is redone, not skipped
    assert Run(run.root).entry(damaged)["gate"]["passed"] is True
    find_models(Run(run.root), mode="adapters", quant="q8_0")


def test_an_unchecked_file_is_refused(tiny_llama, tmp_path):
    run = make_run(tmp_path / "run", tiny_llama, roles=("answer",), targets=["q_proj"])
    with run.writing("gguf/base.q8_0.gguf", "gguf-base", gate=gate.PENDING) as tmp:
        tmp.write_bytes(b"GGUF")
    with pytest.raises(ExarError, match="never checked: the export that wrote it was stopped"):
        gate.require_passed(run, "gguf/base.q8_0.gguf")


def test_quant_limits_come_from_llama_cpp_tables():
    kld, top1, source = gate.quant_limits("q4_0")
    assert kld == pytest.approx(gate.KLD_MARGIN * 0.071940) and top1 is None and "0c1e57098" in source
    kld, top1, _ = gate.quant_limits("q8_0")
    assert kld == pytest.approx(gate.KLD_MARGIN * 0.001355) and top1 == pytest.approx(1 - gate.TOP1_MARGIN * (1 - 0.97674))
    assert gate.quant_limits("q4_k_m", max_kld=0.5)[0] == 0.5
    assert "(none for tq1_0)" in gate.quant_limits("tq1_0")[2]
    failed = gate.verdict([gate.check("mean KL", float("nan"), 0.1)])
    assert failed["passed"] is False  # NaN never passes
