"""What every exar command shares: error handling, quiet output, --debug, --verbose, --run, --json.

A command raises ExarError for anything the user can fix; ``entry_point`` prints it as one line
(``error: ...``), exits non-zero and shows a traceback only under --debug (or EXAR_DEBUG=1).
``entry_point`` also keeps the libraries' own warnings, logs and progress bars off the terminal
(``quiet_libraries``): stderr carries exar's lines and progress bars, and everything else only
with --verbose or --debug (or EXAR_VERBOSE=1).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import click

from exar import __version__
from exar.errors import ExarError

_DEBUG_ENV = "EXAR_DEBUG"
_VERBOSE_ENV = "EXAR_VERBOSE"
_LOUD_FLAGS = ("--verbose", "--debug")

# Set before the libraries load (they load inside the commands): their verbosity, their bars.
_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",   # also transformers' "Loading weights" bars
    "TOKENIZERS_PARALLELISM": "false",     # else tokenizers warns when a process forks
}
# Libraries that log through Python's logging without a handler of their own (bitsandbytes'
# "Failed to load CPU gemm_4bit_forward from kernels-community ..." at import, peft, trl, ...).
_LIBRARY_LOGGERS = ("bitsandbytes", "peft", "trl", "accelerate", "datasets", "huggingface_hub", "torch",
                    "sentence_transformers", "bert_score", "absl", "urllib3", "httpx", "matplotlib", "gguf")


def quiet_libraries() -> None:
    """Keep third-party warnings, logs and progress bars off the terminal; errors still show.

    The one mechanism every exar command uses (through ``entry_point``), unless --verbose,
    --debug or EXAR_VERBOSE=1 asks for everything. A variable the user set is left alone.
    """
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore")
    logging.lastResort.setLevel(logging.ERROR)
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # already imported (exar called from Python): tell it directly
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


def _loud(argv: list[str]) -> bool:
    return any(flag in argv for flag in _LOUD_FLAGS) or bool(os.environ.get(_VERBOSE_ENV) or os.environ.get(_DEBUG_ENV))


def _set_debug(ctx, param, value):
    if value:
        os.environ[_DEBUG_ENV] = "1"


debug_option = click.option(
    "--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
    help="Show full tracebacks instead of one-line errors.",
)
verbose_option = click.option(
    "--verbose", is_flag=True, expose_value=False, is_eager=True,
    help="Also show the libraries' own warnings, logs and progress bars (kept off the terminal by default).",
)
version_option = click.version_option(__version__, prog_name="exar")
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
run_option = click.option(
    "--run", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Run directory (default: the newest run under ./models or $EXAR_MODELS).",
)


def open_run(run_dir: Path | None):
    """The run given by --run, or the newest one (saying which, on stderr)."""
    from exar.rundir import Run

    if run_dir is not None:
        return Run.open(run_dir)
    newest = Run.newest()
    click.echo(f"using run {newest} (the newest; pass --run to choose)", err=True)
    return Run.open(newest)


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def entry_point(command: click.Command):
    """A console-script main() for ``command`` with exar's error contract."""

    def main(argv: list[str] | None = None) -> None:
        if not _loud(sys.argv[1:] if argv is None else list(argv)):
            quiet_libraries()
        try:
            command.main(args=argv, prog_name=command.name, standalone_mode=False)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:  # usage errors: click's own message, exit 2
            e.show()
            sys.exit(e.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("interrupted", err=True)
            sys.exit(130)
        except ExarError as e:
            if os.environ.get(_DEBUG_ENV):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except Exception as e:  # an exar bug or a library failure: still one line by default
            if os.environ.get(_DEBUG_ENV):
                raise
            click.echo(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)
        sys.exit(0)

    return main
