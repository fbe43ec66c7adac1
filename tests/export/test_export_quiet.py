"""llama.cpp's native log (model loads; "lora for ... cannot use buft 'CPU_REPACK'" while the gate
checks a LoRA on the q4_0 base) stays off a real `exar-export`'s stderr, and comes back with --verbose."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from export_builders import make_run
from stderr_lines import foreign_lines

BIN = Path(sys.executable).parent


@pytest.mark.slow  # two real exports of a one-adapter tiny run: ~1 min on 2 cores
@pytest.mark.parametrize("flag", ["", "--verbose"])
def test_llama_cpp_log_stays_off_stderr_unless_verbose(tiny_llama, tmp_path, flag):
    run = make_run(tmp_path / "run", tiny_llama, roles=("exar",))
    done = subprocess.run([str(BIN / "exar-export"), "--run", str(run.root), "--mode", "adapters", "--quant", "q4_0",
                           "--threads", "1", *([flag] if flag else [])], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "writing gguf/exar.lora.gguf" in done.stderr
    noise = foreign_lines(done.stderr)
    if not flag:
        assert noise == []
    else:  # llama.cpp's own lines, from the loads of the gates and from quantization
        assert any(line.startswith(("llama_model_loader", "load_tensors", "llama_model_quantize")) for line in noise)
    log = run.path("gguf/llama-cpp.log").read_text(errors="replace")
    assert "llama_model_quantize" in log or "llama_model_loader" in log  # quantization's log, kept either way
