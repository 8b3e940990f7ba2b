"""The cyclic garbage collector, paused where remap builds objects that all stay alive.

Planning, parsing a large header and building report records allocate an object or two
per key that live as long as the plan or report: the collector would rescan them over and
over (a fifth to a half of the time at 10⁵–10⁶ keys) while freeing nothing.

>>> import gc
>>> with collector_paused():
...     gc.isenabled()
False
>>> gc.isenabled()
True
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["collector_paused", "collector_paused_in"]


@contextmanager
def collector_paused() -> Iterator[None]:
    """The collector off for the block, then as it was found."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def collector_paused_in(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with the collector paused."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with collector_paused():
            return fn(*args, **kwargs)

    return run
