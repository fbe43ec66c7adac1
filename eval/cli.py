"""exar-eval: the command line of exar.eval (a thin layer over its functions)."""

import click

from exar.clikit import debug_option, entry_point, not_built, version_option


@click.group(name="exar-eval")
@version_option
@debug_option
def cli():
    """Quantized vs full precision on the held-out questions."""


@cli.command()
def todo():
    """Not built yet."""
    not_built("exar-eval")


main = entry_point(cli)
