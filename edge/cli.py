"""exar-edge: the command line of exar.edge (a thin layer over its functions)."""

import click

from exar.clikit import debug_option, entry_point, not_built, version_option


@click.group(name="exar-edge")
@version_option
@debug_option
def cli():
    """The validate-then-exclusively-reanswer loop on CPU through llama.cpp."""


@cli.command()
def todo():
    """Not built yet."""
    not_built("exar-edge")


main = entry_point(cli)
