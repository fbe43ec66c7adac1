"""exar-train: the command line of exar.train (a thin layer over its functions)."""

import click

from exar.clikit import debug_option, entry_point, not_built, version_option


@click.group(name="exar-train")
@version_option
@debug_option
def cli():
    """QLoRA training of the three EXAR adapters and the DATASET+ step."""


@cli.command()
def todo():
    """Not built yet."""
    not_built("exar-train")


main = entry_point(cli)
