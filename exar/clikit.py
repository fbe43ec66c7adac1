"""What every exar command shares: error handling, --debug, --run, --json.

A command raises ExarError for anything the user can fix; ``entry_point`` prints it as one line
(``error: ...``), exits non-zero and shows a traceback only under --debug (or EXAR_DEBUG=1).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from exar import __version__
from exar.errors import ExarError, NotBuiltYet

_DEBUG_ENV = "EXAR_DEBUG"


def _set_debug(ctx, param, value):
    if value:
        os.environ[_DEBUG_ENV] = "1"


debug_option = click.option(
    "--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
    help="Show full tracebacks instead of one-line errors.",
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


def not_built(stage: str, issue_hint: str = ""):
    raise NotBuiltYet(f"{stage} is not built yet in this version of exar{issue_hint}")


def entry_point(command: click.Command):
    """A console-script main() for ``command`` with exar's error contract."""

    def main(argv: list[str] | None = None) -> None:
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
