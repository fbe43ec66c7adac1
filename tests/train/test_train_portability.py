"""The train stage on odd shapes and odd machines: 4-bit inference at any width on a CPU, no
Unix-only import, no Hub lookup for a base folder that moved, one peak-memory reader."""

from __future__ import annotations

import subprocess
import sys

import pytest

from exar.errors import ExarError


def test_stories260k_in_4bit_runs_inference_on_the_cpu(stories260k):
    """ffn width 172 is neither a multiple of bitsandbytes' CPU block (32) nor of the NF4 block (64)."""
    import torch

    from exar.train.trainer import device_plan, load_model, load_tokenizer

    model = load_model(stories260k, 4, device_plan(4)).eval()
    tokenizer = load_tokenizer(stories260k)
    kept = [name for name, m in model.named_modules() if getattr(m, "support_avx512bf16_for_cpu", True) is False]
    assert len(kept) == 15 and {name.split(".")[-1] for name in kept} == {"gate_proj", "up_proj", "down_proj"}
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text.startswith(", there was a little girl")  # the 16-bit model's story, through NF4


def test_trainer_imports_without_unix_only_modules():
    code = "import sys; sys.modules['resource'] = None; import exar.train.trainer; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr


def test_one_peak_memory_reader():
    import exar.resources

    assert 1 < exar.resources.peak_rss_mb() < 64 * 1024


def test_a_moved_base_folder_is_an_error_not_a_hub_lookup(tmp_path):
    from exar.train.trainer import device_plan, load_model, load_tokenizer

    gone = tmp_path / "models" / "llama-moved"
    for load in (lambda: load_tokenizer(gone), lambda: load_model(gone, 16, device_plan(16))):
        with pytest.raises(ExarError, match=rf"{gone}: model folder not found .*exar never downloads a base"):
            load()
