"""Export fixtures: a run on the tiny Llama holding three adapters, and that run exported once."""

from __future__ import annotations

import pytest

from export_builders import make_run


@pytest.fixture(scope="session")
def tiny_run(tiny_llama, tmp_path_factory):
    """A run on the tiny Llama with three adapters (every linear layer adapted)."""
    return make_run(tmp_path_factory.mktemp("tiny-run") / "run", tiny_llama)


@pytest.fixture(scope="session")
def exported_tiny_run(tiny_run):
    """``tiny_run`` exported once: f32, q4_0 and q8_0, both modes, consolidated, Ollama Modelfiles."""
    from exar.export.pipeline import ExportOptions, export_run

    summary = export_run(tiny_run, ExportOptions(quants=("q4_0", "q8_0"), mode="both", outtype="f32", ollama=True, threads=2),
                         echo=lambda line: None)
    return tiny_run, summary
