"""Run directory: manifest round trip, hash refusal, atomic writes, newest run, base binding."""

import json
import os
import time

import pytest

from exar.errors import ExarError
from exar.rundir import LOCK_FILE, Run, atomic_path, atomic_write_json, digest_path


def test_manifest_round_trip(tmp_path):
    run = Run.create(tmp_path / "r")
    with run.writing("data/train.jsonl", "split", made_from=["dolly.jsonl"]) as tmp:
        tmp.write_text('{"question": "q"}\n')
    with run.writing("adapters/answer", "adapter", role="answer", is_dir=True) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
        (tmp / "weights.bin").write_bytes(b"\x00" * 10)

    reopened = Run.open(tmp_path / "r")
    entry = reopened.verify("data/train.jsonl")
    assert entry["kind"] == "split" and entry["made_from"] == ["dolly.jsonl"] and entry["bytes"] == 18
    assert len(entry["sha256"]) == 64
    adapter = reopened.verify("adapters/answer")
    assert adapter["role"] == "answer" and adapter["bytes"] == 12
    assert [a["path"] for a in reopened.find(kind="adapter")] == ["adapters/answer"]
    assert reopened.has("adapters/answer") and not reopened.has("adapters/exar")
    on_disk = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert {a["path"] for a in on_disk["artifacts"]} == {"data/train.jsonl", "adapters/answer"}
    assert set(entry) >= {"path", "kind", "role", "bytes", "sha256", "created", "made_from"}


def test_file_hash_is_sha256_of_the_bytes(tmp_path):
    import hashlib

    path = tmp_path / "f"
    path.write_bytes(b"exar")
    assert digest_path(path) == (4, hashlib.sha256(b"exar").hexdigest())


def test_changed_artifact_is_refused(tmp_path):
    run = Run.create(tmp_path / "r")
    with run.writing("gguf/base.f16.gguf", "gguf-base") as tmp:
        tmp.write_bytes(b"GGUF" + b"\x01" * 100)
    (tmp_path / "r" / "gguf" / "base.f16.gguf").write_bytes(b"GGUF" + b"\x02" * 100)
    with pytest.raises(ExarError, match="contents changed"):
        run.verify("gguf/base.f16.gguf")
    with pytest.raises(ExarError, match="not in the manifest"):
        run.verify("gguf/other.gguf")


def test_crash_mid_write_leaves_no_final_named_file(tmp_path):
    final = tmp_path / "out" / "model.gguf"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half a model")
            raise RuntimeError("killed")
    assert not final.exists()
    assert list((tmp_path / "out").iterdir()) == []  # the temporary file is gone too


def test_crash_mid_write_keeps_the_previous_version(tmp_path):
    final = tmp_path / "settings.json"
    atomic_write_json(final, {"v": 1})
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise KeyboardInterrupt
    assert json.loads(final.read_text()) == {"v": 1}


def test_crash_mid_folder_write_keeps_the_old_folder(tmp_path):
    run = Run.create(tmp_path / "r")
    with run.writing("hf/answer", "hf-merged", is_dir=True) as tmp:
        (tmp / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with run.writing("hf/answer", "hf-merged", is_dir=True) as tmp:
            (tmp / "config.json").write_text("new, half")
            raise RuntimeError
    assert (tmp_path / "r" / "hf" / "answer" / "config.json").read_text() == "old"
    assert sorted(p.name for p in (tmp_path / "r" / "hf").iterdir()) == ["answer"]
    run.verify("hf/answer")


def test_newest_run_is_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("EXAR_MODELS", str(tmp_path / "models"))
    with pytest.raises(ExarError, match="no run under"):
        Run.newest()
    first = Run.create()
    time.sleep(1.1)
    second = Run.create()
    (tmp_path / "models" / "base" / "x").mkdir(parents=True)
    assert Run.newest() == second.root != first.root


def test_run_refuses_another_base(tmp_path):
    run = Run.create(tmp_path / "r")
    run.bind_base({"name": "tiny", "path": "/a", "fingerprint": "aaa"})
    run.bind_base({"name": "tiny", "path": "/elsewhere", "fingerprint": "aaa"})  # same weights: fine
    with pytest.raises(ExarError, match="made with base 'tiny'"):
        run.bind_base({"name": "other", "path": "/b", "fingerprint": "bbb"})


def test_open_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ExarError, match="not an exar run"):
        Run.open(tmp_path)
    (tmp_path / "run.json").write_text("{broken")
    with pytest.raises(ExarError, match="not valid JSON"):
        Run.open(tmp_path).settings


def test_settings_sections(tmp_path):
    run = Run.create(tmp_path / "r")
    run.update_settings("validator", {"threshold": 0.42})
    assert Run.open(run.root).settings["validator"] == {"threshold": 0.42}
    assert "exar_version" in run.settings and "created" in run.settings
    assert set(os.listdir(run.root)) == {"run.json", "manifest.json", LOCK_FILE}
