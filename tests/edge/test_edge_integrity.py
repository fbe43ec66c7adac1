"""The edge checks what it loads: a size check on every call, the sha256 on the first load in a process."""

from __future__ import annotations

import pytest

import exar.rundir as rundir
from exar.edge.runtime import _checked
from exar.errors import ExarError
from exar.rundir import Run


def test_a_same_size_damaged_gguf_is_refused_and_a_good_one_hashed_once(tmp_path, monkeypatch):
    run = Run.create(tmp_path / "r")
    with run.writing("gguf/base.q4_0.gguf", "gguf-base") as tmp:
        tmp.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    rundir._SHA_CACHE.clear()
    hashed = []
    real = rundir.hashlib.sha256
    monkeypatch.setattr(rundir.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    for _ in range(3):
        assert _checked(run, "gguf/base.q4_0.gguf", {}) == run.path("gguf/base.q4_0.gguf")
    assert len(hashed) == 1

    damaged = bytearray(run.path("gguf/base.q4_0.gguf").read_bytes())
    damaged[100] ^= 0xFF  # one flipped byte: the size still matches the manifest
    run.path("gguf/base.q4_0.gguf").write_bytes(bytes(damaged))
    with pytest.raises(ExarError, match=r"base.q4_0.gguf: sha256 \w{12}, the manifest recorded \w{12}; the file is damaged"):
        _checked(run, "gguf/base.q4_0.gguf", {})


def test_a_gguf_made_from_an_adapter_retrained_since_is_refused(tmp_path):
    run = Run.create(tmp_path / "r")
    with run.writing("adapters/validator/adapter_model.safetensors", "adapter", role="validator") as tmp:
        tmp.write_bytes(b"first training")
    with run.writing("gguf/validator.lora.gguf", "gguf-lora", role="validator",
                     made_from=["adapters/validator/adapter_model.safetensors"]) as tmp:
        tmp.write_bytes(b"GGUF" + bytes(64))
    assert _checked(run, "gguf/validator.lora.gguf", run.stale()) == run.path("gguf/validator.lora.gguf")

    with run.writing("adapters/validator/adapter_model.safetensors", "adapter", role="validator") as tmp:
        tmp.write_bytes(b"retrained")  # the adapter changed; the LoRA GGUF was not exported again
    with pytest.raises(ExarError, match=r"validator.lora.gguf: stale \(made from adapters/validator/adapter_model"
                                        r".safetensors with sha256 \w{12}, which is now \w{12}\); run `exar-export"):
        _checked(run, "gguf/validator.lora.gguf", run.stale())
