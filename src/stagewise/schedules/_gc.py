"""Pause the cyclic garbage collector while building many small tuples.

A large schedule, its execution order and its simulated timeline are hundreds of thousands of
tuples. Each allocation counts towards a collection, and each full collection walks every live
object again, so building them with the collector on costs about twice the work itself. None
of these tuples can form a reference cycle, so nothing is lost by collecting afterwards.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused_gc"]


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector inside the block; restore its previous state after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
