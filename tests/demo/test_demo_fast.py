"""`exar demo --fast` end to end through the real CLI: the run must hold what the manifest says."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from exar.rundir import Run


@pytest.mark.slow
def test_demo_fast_leaves_a_complete_run(smollm2_base, tmp_path):
    models = Path(smollm2_base.path).parents[1]  # reuse the session's imported base
    run_dir = tmp_path / "demo-fast"
    env = {**os.environ, "EXAR_MODELS": str(models)}
    result = subprocess.run(["exar", "demo", "--fast", "--run", str(run_dir)], env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== exar demo: what was measured ==" in result.stdout
    assert "chart: " in result.stdout
    assert "does the validator know?" in result.stdout and "validator AUROC" in result.stdout
    assert "right->wrong" in result.stdout and "answering the 70% it trusts most" in result.stdout

    run = Run.open(run_dir)
    for entry in run.artifacts:  # every recorded artifact is on disk with its recorded hash
        run.verify(entry["path"])
    assert {a["role"] for a in run.find(kind="adapter")} == {"answer", "validator", "exar"}
    calibration = run.settings["validator"]["calibration"]
    assert 0.0 <= run.settings["validator"]["threshold"] == calibration["threshold"] <= 1.0
    assert calibration["questions"] == run.settings["data"]["counts"]["dev"] > 0
    assert run.has("data/dataset-plus.jsonl")

    ggufs = run.find(kind="gguf-base") + run.find(kind="gguf-merged") + run.find(kind="gguf-lora")
    paths = {a["path"] for a in ggufs}
    assert {"gguf/base.q4_0.gguf", "gguf/base.f16.gguf", "gguf/answer.q4_0.gguf",
            "gguf/validator.lora.gguf", "gguf/exar.lora.gguf"} <= paths
    from llama_cpp import Llama

    for rel in sorted(p for p in paths if not p.endswith(".lora.gguf")):
        model = Llama(str(run.path(rel)), n_ctx=64, n_threads=2, verbose=False, vocab_only=True)
        assert model.n_vocab() == 49152, rel
        model.close()

    report = json.loads(run.path("eval/demo/report.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["hf", "gguf:q8_0", "gguf:q4_0", "adapters:q4_0"]
    assert all(v["mean"]["bertscore_f"] > 0 for v in report["variants"])
    assert all(v["metacognition"]["n"] == report["test"]["questions"] for v in report["variants"])
    png = run.path("eval/demo/report.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    answers = run.path("edge/answers.jsonl").read_text().splitlines()
    assert len(answers) == run.settings["data"]["counts"]["test"]

    rerun = subprocess.run(["exar", "demo", "--fast", "--run", str(run_dir)], env=env,
                           capture_output=True, text=True, timeout=1800)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "is done" in rerun.stderr  # the rerun skipped what the manifest already held
