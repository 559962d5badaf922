"""Registers the ``auto`` schedule: the schedule search, for the registry's (p, m, v) signature.

Imported by ``stagewise.search`` (and so by ``import stagewise``), so that ``build("auto", ...)``,
``stagewise.schedules.names()`` and the CLI find it. It lives here, above the simulator, because
the search times its candidates with :func:`stagewise.sim.simulate`; ``stagewise.schedules``
itself imports nothing from ``sim`` or ``search``.

``auto`` is :func:`stagewise.search.search_schedule` with uniform costs F = I = W, 1F1B's memory
(p units per rank), looped placement, and a fixed set of variants so the result does not depend
on the clock. For your own costs, link and memory limit call ``search_schedule`` directly.
"""

from __future__ import annotations

from stagewise.schedules.ir import Schedule
from stagewise.schedules.registry import Generator, register
from stagewise.search.schedule_search import search_schedule
from stagewise.sim.costs import Costs

__all__ = ["AUTO", "auto"]


def auto(num_ranks: int, num_microbatches: int, num_chunks: int) -> Schedule:
    """The searched schedule for uniform costs F = I = W within p units of memory per rank.

    Example:
        >>> auto(4, 8, 1).num_stages
        4
    """
    n, v = num_ranks * num_chunks, num_chunks
    costs = Costs.per_stage([1.0 / v] * n, [2.0 / v] * n, [1.0 / v] * n)
    found = search_schedule(num_ranks, num_microbatches, costs, memory_limit=num_ranks,
                            placement="looped", max_variants=0)
    return found.schedule


AUTO = Generator(
    "auto",
    auto,
    "found by search (list scheduling) for F=I=W within 1F1B's memory, p units per rank",
    fixed_chunks=None,
    ops=3,  # the list scheduler splits every backward
)

register(AUTO)
