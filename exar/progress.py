"""Progress for long steps: a tqdm bar for loops, a timed status line for single long calls."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def bar(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", initial: int = 0) -> Iterator[T]:
    """A tqdm progress bar on stderr."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, initial=initial, file=sys.stderr, dynamic_ncols=True)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """Say what a long call is doing, then how long it took."""
    print(f"{message} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"  done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
