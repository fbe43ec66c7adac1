"""exar demo: train -> export -> edge -> eval on the built-in base, CPU only."""

from exar.clikit import not_built


def run_demo(fast: bool = False, run_dir=None):
    not_built("exar demo")
