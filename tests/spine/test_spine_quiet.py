"""Quiet by default: an exar command's stderr holds its own lines; the libraries' warnings, logs
and advice come back with --verbose. (The real chain on stories260K: tests/train/test_train_stories_4bit.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stderr_lines import foreign_lines

COMMAND = """
import logging, sys, warnings
import click
from exar.clikit import entry_point, verbose_option

@click.command()
@verbose_option
def cmd():
    import transformers  # loads inside the command, as in every exar CLI
    logging.getLogger("bitsandbytes").warning("Failed to load CPU gemm_4bit_forward: pip install kernels")
    transformers.logging.get_logger("transformers.modeling_utils").warning("a transformers warning")
    warnings.warn("a library's FutureWarning", FutureWarning)
    click.echo("answer: 2 steps on cpu", err=True)

entry_point(cmd)(sys.argv[1:])
"""


@pytest.mark.parametrize("flag", ["", "--verbose"])
def test_library_noise_stays_off_stderr_unless_verbose(flag):
    env = {k: v for k, v in os.environ.items() if k not in ("EXAR_VERBOSE", "EXAR_DEBUG", "TRANSFORMERS_VERBOSITY")}
    result = subprocess.run([sys.executable, "-c", COMMAND, *([flag] if flag else [])], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    if not flag:
        assert result.stderr == "answer: 2 steps on cpu\n"
        return
    noise = foreign_lines(result.stderr)
    assert any("pip install kernels" in line for line in noise)
    assert any("a transformers warning" in line for line in noise)
    assert any("FutureWarning" in line for line in noise)
