"""Registers the schedules beyond 1F1B: looped BFS, ZB-H1, ZB-H2, ZB-V, DualPipeV and auto.

Imported by ``stagewise.schedules`` so that ``build("zb-h1", ...)`` and the CLI find them.
``auto`` is :func:`stagewise.schedules.search.search_schedule` for the registry's (p, m, v)
signature: uniform costs F = I = W, 1F1B's memory (p units per rank), looped placement, and a
fixed set of variants so the result does not depend on the clock. For your own costs, link and
memory limit call ``search_schedule`` directly.
"""

from __future__ import annotations

from stagewise.schedules.dualpipe import dualpipe_v
from stagewise.schedules.ir import Schedule
from stagewise.schedules.looped_bfs import looped_bfs
from stagewise.schedules.registry import Generator, register
from stagewise.schedules.zbv import zb_v
from stagewise.schedules.zero_bubble import zb_h1, zb_h2

__all__ = ["GENERATORS"]


def _auto(num_ranks: int, num_microbatches: int, num_chunks: int) -> Schedule:
    from stagewise.schedules.search import search_schedule
    from stagewise.sim.costs import Costs

    n, v = num_ranks * num_chunks, num_chunks
    costs = Costs.per_stage([1.0 / v] * n, [2.0 / v] * n, [1.0 / v] * n)
    found = search_schedule(num_ranks, num_microbatches, costs, memory_limit=num_ranks,
                            placement="looped", max_variants=0)
    return found.schedule


GENERATORS = (
    Generator(
        "looped-bfs",
        looped_bfs,
        "breadth first over v looped chunks: all forwards of a chunk, then the next",
        default_chunks=2,
        fixed_chunks=None,
    ),
    Generator(
        "zb-h1",
        lambda p, m, v: zb_h1(p, m),
        "zero bubble H1: 1F1B memory, W deferred into the drain, bubble (p-1)(F+I-W)",
    ),
    Generator(
        "zb-h2",
        lambda p, m, v: zb_h2(p, m),
        "zero bubble H2: longer warm-up, about 2x memory, per-rank bubble (p-1)(F+I-2W)",
    ),
    Generator(
        "zb-v",
        lambda p, m, v: zb_v(p, m),
        "zero bubble V: two chunks per rank in a V, p units of memory on every rank",
        default_chunks=2,
        fixed_chunks=2,
    ),
    Generator(
        "dualpipev",
        lambda p, m, v: dualpipe_v(p, m),
        "DeepSeek DualPipeV: V placement, overlapped F&B pairs (as consecutive actions)",
        default_chunks=2,
        fixed_chunks=2,
    ),
    Generator(
        "auto",
        _auto,
        "found by search (list scheduling) for F=I=W within 1F1B's memory, p units per rank",
        fixed_chunks=None,
    ),
)

for _generator in GENERATORS:
    register(_generator)
