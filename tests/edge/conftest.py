"""Edge fixtures: one tiny exported run per session (about 15 s), copied when a test damages it."""

from __future__ import annotations

import shutil

import pytest

from edge_run import build_exported_run
from exar.rundir import Run


@pytest.fixture(scope="session")
def exported_run(tiny_llama, tmp_path_factory) -> Run:
    pytest.importorskip("llama_cpp")
    return build_exported_run(tmp_path_factory.mktemp("edge") / "run", tiny_llama)


@pytest.fixture
def run_copy(exported_run, tmp_path) -> Run:
    """A private copy of the exported run, for tests that break it."""
    return Run(shutil.copytree(exported_run.root, tmp_path / "run", ignore=shutil.ignore_patterns("hf", "adapters")))
