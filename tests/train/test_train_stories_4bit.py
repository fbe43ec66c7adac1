"""The real stories260K (ffn width 172) in 4-bit on the CPU through every command line, as a new
user runs it: the chain completes, stderr holds only exar's lines and progress bars, and a stage
redone with --force makes what was built on it stale until it is redone too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stderr_lines import foreign_lines
from tiny import SHARED

DOLLY49 = SHARED / "data" / "dolly" / "databricks-dolly-15k.head49.jsonl"
TRAIN = ["--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--max-seq-len", "192"]
BIN = Path(sys.executable).parent


def cli(*argv, cwd: Path) -> subprocess.CompletedProcess:
    """An exar console script in a subprocess, as a user's terminal runs it (a real stderr)."""
    script, *args = [str(a) for a in argv]
    env = {k: v for k, v in os.environ.items() if k not in ("EXAR_VERBOSE", "EXAR_DEBUG")}
    return subprocess.run([str(BIN / script), *args], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**env, "EXAR_MODELS": str(cwd / "models")})


@pytest.fixture(scope="module")
def trained(stories260k, tmp_path_factory):
    """`exar-train all` on stories260K, 4-bit (the default), tiny step counts."""
    if not DOLLY49.is_file():
        pytest.skip(f"{DOLLY49} is absent")
    where = tmp_path_factory.mktemp("stories-4bit")
    result = cli("exar-train", "all", "--base", stories260k, "--data", DOLLY49, "--run", where / "run", *TRAIN,
                 "--predict-limit", "4", "--temperature", "0.6", "--max-new-tokens", "8", cwd=where)
    return where / "run", result


def _copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained[0], tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.shared
def test_all_in_4bit_on_the_cpu_completes_with_only_exar_on_stderr(trained):
    run, result = trained
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = {a["path"]: a for a in json.loads((run / "manifest.json").read_text())["artifacts"]}
    assert {f"adapters/{role}" for role in ("answer", "validator", "exar")} <= set(manifest)
    assert len((run / "data" / "pre-dataset-plus.jsonl").read_text().splitlines()) > 0
    settings = json.loads((run / "run.json").read_text())
    assert settings["stage-zero"]["bits"] == 4 and settings["stage-zero"]["device"] == "cpu"
    assert settings["validator"]["bits"] == 4 and settings["exar"]["steps"] == 2
    assert "predict: 100%|" in result.stderr and "answer: " in result.stderr
    assert foreign_lines(result.stderr) == []


@pytest.mark.slow
@pytest.mark.shared
def test_export_edge_eval_and_status_print_only_exar_on_stderr(trained, tmp_path):
    run = _copy(trained, tmp_path)
    steps = [
        ("exar-export", "--run", run, "--mode", "adapters", "--quant", "q8_0", "--threads", "1"),
        ("exar-edge", "ask", "--run", run, "--max-rounds", "1", "What is the capital of France?"),
        ("exar-eval", "compare", "--run", run, "--variants", "hf,adapters:q8_0", "--limit", "2",
         "--resamples", "20", "--max-new-tokens", "8", "--max-rounds", "1"),
        ("exar", "status", "--run", run),
    ]
    for argv in steps:
        result = cli(*argv, cwd=tmp_path)
        assert result.returncode == 0, (argv[:2], result.stderr[-2000:])
        assert foreign_lines(result.stderr) == [], argv[:2]


@pytest.mark.slow
@pytest.mark.shared
def test_a_forced_redo_makes_what_was_built_on_it_stale(trained, tmp_path):
    run = _copy(trained, tmp_path)
    assert cli("exar-train", "annotate", "--run", run, "--force", cwd=tmp_path).returncode == 0

    refused = cli("exar-train", "validator", "--run", run, *TRAIN, cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"error: {run}/adapters/validator is stale: data/dataset-plus.jsonl was redone with --force; "
        f"pass --force to redo it (`exar status --run {run}` lists everything stale)"]

    export = cli("exar-export", "--run", run, "--mode", "adapters", "--quant", "q8_0", cwd=tmp_path)
    assert export.returncode == 1 and export.stderr.strip().splitlines() == [
        f"error: {run}/adapters/validator is stale: data/dataset-plus.jsonl was redone with --force; retrain it "
        f"(`exar-train validator --run {run} --force`) before exporting"]
    assert not run.joinpath("gguf").exists()

    status = cli("exar", "status", "--run", run, cwd=tmp_path).stdout
    assert "  STALE    adapters/validator" in status and "  STALE    adapters/exar" in status
    assert "made from data/dataset-plus.jsonl (" in status
    assert "  OK       data/dataset-plus.jsonl" in status and "  OK       adapters/answer" in status
    assert "annotate: " in cli("exar-train", "annotate", "--run", run, cwd=tmp_path).stderr  # current: skipped
