"""One writer per run under a multi-process launch: two processes (gloo, CPU) make one run folder,
one manifest and one adapter, with the losses one process gets from the same global batch.

`accelerate launch --cpu --num_processes 2` starts a single process unless MPI is installed
(accelerate's CPU launcher hands multi-process runs to mpirun), so the test launches through
accelerate's torch.distributed launcher (`--multi_gpu`), which on a machine without CUDA runs
two CPU processes over gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import SHARED

DOLLY49 = SHARED / "data" / "dolly" / "databricks-dolly-15k.head49.jsonl"
BIN = Path(sys.executable).parent


def _stage_zero(models: Path, tiny_llama, batch: int, accum: int, launcher=()) -> subprocess.CompletedProcess:
    argv = [*launcher, str(BIN / "exar-train"), "stage-zero", "--base", str(tiny_llama), "--data", str(DOLLY49),
            "--bits", "16", "--max-steps", "3", "--batch-size", str(batch), "--grad-accum", str(accum),
            "--lora-dropout", "0", "--no-gradient-checkpointing", "--max-seq-len", "128", "--limit", "20",
            "--save-steps", "2"]
    env = {**os.environ, "EXAR_MODELS": str(models), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "logs" / "answer.train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.shared
def test_two_processes_write_one_run_with_the_losses_of_one(tmp_path, tiny_llama):
    if not DOLLY49.is_file():
        pytest.skip(f"{DOLLY49} is absent")
    launcher = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    two = _stage_zero(tmp_path / "two", tiny_llama, batch=2, accum=1, launcher=launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("answer: 3 steps on cpu") == 2  # both processes trained and report

    runs = list((tmp_path / "two").iterdir())
    assert len(runs) == 1                                   # no --run: the main process named it for both
    run = runs[0]
    manifest = json.loads((run / "manifest.json").read_text())["artifacts"]
    assert sorted(a["path"] for a in manifest) == ["adapters/answer", "data/dev.jsonl", "data/test.jsonl",
                                                   "data/train.jsonl", "logs/answer.train_log.jsonl"]
    assert json.loads((run / "run.json").read_text())["stage-zero"]["steps"] == 3

    one = _stage_zero(tmp_path / "one", tiny_llama, batch=2, accum=2)  # the same 4 rows per optimizer step
    assert one.returncode == 0, one.stderr[-3000:]
    assert _losses(run) == pytest.approx(_losses(next((tmp_path / "one").iterdir())), abs=1e-5)
