"""The command line: every entry point answers --help, start-up stays light, errors are one line."""

import subprocess
import sys

import pytest

from exar import __version__

SCRIPTS = ["exar", "exar-train", "exar-export", "exar-edge", "exar-eval"]


def run(*args, env=None):
    return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_version(script):
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "--debug" in result.stdout
    version = run(script, "--version")
    assert version.returncode == 0 and __version__ in version.stdout


def test_export_help_shows_quant():
    result = run("exar-export", "--help")
    assert "--quant" in result.stdout


@pytest.mark.parametrize("sub", ["train", "export", "edge", "eval", "demo"])
def test_group_mounts_every_stage(sub):
    result = run("exar", sub, "--help")
    assert result.returncode == 0, result.stderr


def test_startup_imports_no_heavy_library():
    code = (
        "import sys, exar.cli\n"
        "heavy = [m for m in ('torch', 'transformers', 'llama_cpp', 'peft', 'trl', 'bert_score') if m in sys.modules]\n"
        "print(heavy)"
    )
    result = run(sys.executable, "-c", code)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_user_error_is_one_line_with_nonzero_exit(tmp_path):
    result = run("exar-edge", "ask", "--run", str(tmp_path / "nowhere"), "What?")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_usage_error_exits_2():
    result = run("exar", "no-such-command")
    assert result.returncode == 2 and "No such command" in result.stderr
