"""A real `exar-export` killed part-way, and two at once on one run.

Killed (SIGKILL) mid-export, no final-named file is partial and the rerun completes: a consistent
manifest, nothing left behind, the finished steps not redone, the same bytes as an uninterrupted
export. Two at once: one proceeds, the other is refused in one line naming the first.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from exar.rundir import TMP_TAG, Run

BIN = Path(sys.executable).parent
EXPORT = ["--mode", "adapters", "--quant", "q8_0", "--threads", "1"]


def _start(run: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "exar-export"), "--run", str(run), *EXPORT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(child: subprocess.Popen, line: str) -> None:
    for got in child.stderr:
        if got.strip() == line:
            return
    raise AssertionError(f"the export ended without printing {line!r}")


@pytest.fixture(scope="module")
def concurrent(tiny_run, tmp_path_factory):
    """Export A holds the run; export B starts on it meanwhile. A's finished run is the reference."""
    root = Path(shutil.copytree(tiny_run.root, tmp_path_factory.mktemp("concurrent") / "run"))
    first = _start(root)
    _wait_for(first, "writing gguf/base.f16.gguf")
    second = subprocess.run([str(BIN / "exar-export"), "--run", str(root), *EXPORT], capture_output=True,
                            text=True, timeout=300)
    first.stderr.read()
    assert first.wait(timeout=300) == 0
    return Run(root), first.pid, second


@pytest.mark.slow
def test_a_second_export_on_the_same_run_is_refused_naming_the_first(concurrent):
    run, first_pid, second = concurrent
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: {run.root}: another exar process is writing this run: export (pid {first_pid} on ")
    assert "exar-export --run" in lines[0] and lines[0].endswith("wait for it to finish (or stop it) and run this again")
    assert {a["path"] for a in run.artifacts} >= {"gguf/base.q8_0.gguf", "gguf/exar.lora.gguf"}


@pytest.mark.slow
def test_an_export_killed_part_way_recovers_on_rerun(concurrent, tiny_run, tmp_path):
    from gguf import GGUFReader

    reference = concurrent[0]
    run = Run(shutil.copytree(tiny_run.root, tmp_path / "run"))
    child = _start(run.root)
    _wait_for(child, "writing gguf/base.q8_0.gguf")
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    finals = [p for p in run.path("gguf").iterdir() if TMP_TAG not in p.name and p.suffix == ".gguf"]
    assert run.path("gguf/base.f16.gguf") in finals
    for path in finals:
        GGUFReader(str(path))  # complete, or it would not be under its final name
    run.artifacts  # the manifest is valid JSON

    rerun = subprocess.run([str(BIN / "exar-export"), "--run", str(run.root), *EXPORT], capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "unchanged: gguf/base.f16.gguf" in rerun.stderr  # what was finished is not redone
    assert list(run.root.rglob(f"*{TMP_TAG}*")) == []
    for entry in run.artifacts:
        run.verify(entry["path"])
    assert run.stale() == {}
    want = {e["path"]: e["sha256"] for e in reference.artifacts if e["path"].endswith(".gguf")}
    assert {e["path"]: e["sha256"] for e in run.artifacts if e["path"].endswith(".gguf")} == want
