"""A run you can trust: durable renames, one writer with a named holder, crash leftovers cleared,
skip checks that see through an unrecorded rename, and stale artifacts caught with their reasons."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import exar.rundir as rundir
from exar.errors import ExarError
from exar.rundir import TMP_TAG, Run, atomic_path

HOLD = textwrap.dedent("""
    import sys, time
    from exar.rundir import Run
    with Run(sys.argv[1]).lock("export"):
        print("held", flush=True)
        time.sleep(120)
""")


def _write(run: Run, rel: str, text: str, made_from=()) -> dict:
    with run.writing(rel, "test", made_from=made_from) as tmp:
        tmp.write_text(text)
    return run.entry(rel)


def test_file_and_folder_are_flushed_around_the_rename(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(rundir, "_fsync_file", lambda p: synced.append(("file", p.name, p.parent.exists())))
    monkeypatch.setattr(rundir, "_fsync_dir", lambda p: synced.append(("dir", p.name, (tmp_path / "a.txt").exists())))
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    assert synced[0][0] == "file" and synced[0][1].startswith("a.txt" + TMP_TAG)  # the bytes, before the rename
    assert synced[-1] == ("dir", tmp_path.name, True)                           # the rename itself, after it
    synced.clear()
    with atomic_path(tmp_path / "folder", is_dir=True) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    assert ("file", "w.bin", True) in synced and synced[-1][:2] == ("dir", tmp_path.name)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    run = Run.create(tmp_path / "r")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ExarError, match=rf"another exar process is writing this run: export \(pid {holder.pid} on "):
            run.update_settings("x", {})
        assert run.writer().startswith(f"export (pid {holder.pid}")
        holder.send_signal(signal.SIGKILL)  # the system drops a dead holder's lock
        holder.wait()
        run.update_settings("x", {"after": "kill"})
        assert run.settings["x"] == {"after": "kill"} and run.writer() is None
    finally:
        holder.kill()


def test_lock_is_reentrant_and_the_next_writer_clears_crash_leftovers(tmp_path, capsys):
    run = Run.create(tmp_path / "r")
    with run.lock("export"):
        _write(run, "gguf/a.gguf", "aaaa")  # nested: the same process may write
    (run.path("gguf") / f"b.gguf{TMP_TAG}1234abcd").write_text("half a file")
    old = run.path(f"hf/answer{TMP_TAG}old-1234abcd")  # killed between the two renames of a folder update
    old.mkdir(parents=True)
    (old / "config.json").write_text("old")
    with run.lock("export"):
        pass
    assert sorted(p.name for p in run.path("gguf").iterdir()) == ["a.gguf"]
    assert (run.path("hf/answer") / "config.json").read_text() == "old"
    assert "run: restored hf/answer (left by an interrupted writer)" in capsys.readouterr().err


def test_a_file_renamed_in_but_not_recorded_is_not_taken_as_done(tmp_path):
    run = Run.create(tmp_path / "r")
    _write(run, "data/p.jsonl", "old!")
    assert run.has("data/p.jsonl")
    with atomic_path(run.path("data/p.jsonl")) as tmp:  # a writer died after its rename, before recording
        tmp.write_text("new!")                          # same size: a size check would call it done
    assert not run.has("data/p.jsonl")


def test_stale_artifacts_are_reported_with_their_inputs_and_forced_redos_cascade(tmp_path):
    run = Run.create(tmp_path / "r")
    first = _write(run, "data/a.jsonl", "a1")
    made = _write(run, "data/b.jsonl", "b1", made_from=["data/a.jsonl"])
    _write(run, "adapters/c", "c1", made_from=["data/b.jsonl"])
    assert made["made_from_sha256"] == {"data/a.jsonl": first["sha256"]}
    _write(run, "data/outside.jsonl", "o", made_from=["../user-data.jsonl"])  # not a run artifact: not compared
    assert run.stale() == {} and run.done("data/b.jsonl")

    second = _write(run, "data/a.jsonl", "a2")  # an upstream stage was redone
    assert run.stale() == {
        "data/b.jsonl": [f"made from data/a.jsonl with sha256 {first['sha256'][:12]}, which is now {second['sha256'][:12]}"],
        "adapters/c": ["made from data/b.jsonl, which is stale"],
    }
    with pytest.raises(ExarError, match=r"data/b.jsonl is stale: made from data/a.jsonl .*; pass --force to redo it"):
        run.done("data/b.jsonl")

    assert run.done("data/b.jsonl", force=True) is False
    _write(run, "data/b.jsonl", "b1", made_from=["data/a.jsonl"])  # redone: the same bytes as before
    assert run.stale() == {"adapters/c": ["data/b.jsonl was redone with --force"]}
    rows = {r["path"]: r for r in run.status()}
    assert rows["adapters/c"]["state"] == "stale" and rows["data/a.jsonl"]["state"] == "ok"
    run.path("data/a.jsonl").write_text("XY")
    assert {r["path"]: r["state"] for r in run.status()}["data/a.jsonl"] == "changed"


def test_status_command_names_what_is_stale_and_what_it_was_made_from(tmp_path):
    run = Run.create(tmp_path / "r")
    _write(run, "data/a.jsonl", "a1")
    _write(run, "data/b.jsonl", "b1", made_from=["data/a.jsonl"])
    sha = _write(run, "data/a.jsonl", "a2")["sha256"]
    result = subprocess.run(["exar", "status", "--run", str(run.root)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "  STALE    data/b.jsonl" in result.stdout
    assert "made from data/a.jsonl (" in result.stdout and f"which is now {sha[:12]}" in result.stdout
    assert "2 artifacts: 1 ok, 1 stale, 0 changed, 0 missing" in result.stdout
    as_json = json.loads(subprocess.run(["exar", "status", "--run", str(run.root), "--json"], capture_output=True,
                                        text=True, timeout=60).stdout)
    assert {a["path"]: a["state"] for a in as_json["artifacts"]} == {"data/a.jsonl": "ok", "data/b.jsonl": "stale"}
    assert as_json["writer"] is None


def test_verify_hashes_once_per_process_while_the_file_is_unchanged(tmp_path, monkeypatch):
    run = Run.create(tmp_path / "r")
    _write(run, "gguf/m.gguf", "GGUF" * 100)
    rundir._SHA_CACHE.clear()
    calls = []
    real = rundir.hashlib.sha256
    monkeypatch.setattr(rundir.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    run.verify("gguf/m.gguf")
    run.verify("gguf/m.gguf")
    assert len(calls) == 1
    stat = os.stat(run.path("gguf/m.gguf"))
    run.path("gguf/m.gguf").write_text("FUFG" * 100)  # same size, new mtime: hashed again, and refused
    os.utime(run.path("gguf/m.gguf"), ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    with pytest.raises(ExarError, match="contents changed"):
        run.verify("gguf/m.gguf")
