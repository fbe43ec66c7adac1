"""An exported run for the eval tests: the real stories260K, three seeded PEFT adapters, exported by export_run.

stories260K, not the random tiny Llama: a trained model has clear margins between its top tokens,
so greedy decoding through transformers and through llama.cpp can be required to agree token for
token (the random model's top two logits often lie within 1e-3 of each other).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from exar.constants import ROLES, TEST_SPLIT

TEST_QA = [
    {"question": "What is the capital of France?", "answer": "Paris", "aliases": ["Paris, France"]},
    {"question": "Who did Lily play with in the park?", "answer": "her dog", "aliases": ["a dog"]},
    {"question": "What colour was the big ball?", "answer": "red"},
    {"question": "What did Tom want to eat?", "answer": "a cake", "context": "Tom was hungry. He saw a cake."},
]
THREADS = 1  # on a shared 2-core machine one thread is several times faster than two


def make_adapters(run, base_dir: Path, *, rank: int = 8, seed: int = 0) -> None:
    """Three PEFT adapters on q/k/v/o with seeded random lora_B, so each role changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for index, role in enumerate(ROLES):
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        generator = torch.Generator().manual_seed(seed + index)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        with run.writing(f"adapters/{role}", "adapter", role=role, is_dir=True) as tmp:
            model.save_pretrained(str(tmp))


def build_run(base_dir: Path, root: Path, rows: list[dict] = TEST_QA):
    """A trained-looking run: base, prompt style, validator threshold, adapters, held-out split."""
    from exar.basemodel import prompt_style, resolve_base
    from exar.data import QA, write_jsonl
    from exar.rundir import Run

    run = Run.create(root)
    run.bind_base(resolve_base(base_dir).to_dict())
    run.update_settings("prompt", prompt_style(base_dir).to_dict())
    run.update_settings("validator", {"threshold": 0.5})
    make_adapters(run, base_dir)
    with run.writing(TEST_SPLIT, "split") as tmp:
        write_jsonl(tmp, [QA.from_dict(row).to_dict() for row in rows])
    return run


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's thread count for a block (it is process-wide), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def eval_run_template(stories260k, tmp_path_factory):
    """The run exported once per session (f32 + q4_0, merged and adapters); tests use copies."""
    pytest.importorskip("llama_cpp")
    from exar.export.pipeline import ExportOptions, export_run

    with torch_threads(THREADS):
        run = build_run(stories260k, tmp_path_factory.mktemp("eval-run") / "run")
        export_run(run, ExportOptions(quants=("q4_0",), mode="both", outtype="f32", consolidated=False,
                                      threads=THREADS), echo=lambda line: None)
    return run.root


@pytest.fixture
def eval_run(eval_run_template, tmp_path):
    """A private copy of the exported run (tests write reports into it)."""
    from exar.rundir import Run

    root = tmp_path / "run"
    shutil.copytree(eval_run_template, root)
    return Run.open(root)
