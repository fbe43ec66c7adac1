"""exar-export: the command line of exar.export (a thin layer over its functions)."""

import click

from exar.clikit import debug_option, entry_point, not_built, version_option


@click.group(name="exar-export")
@version_option
@debug_option
def cli():
    """Merge, convert to GGUF, quantize and verify a run's adapters."""


@cli.command()
def todo():
    """Not built yet."""
    not_built("exar-export")


main = entry_point(cli)
