"""Registers the schedules beyond 1F1B: looped BFS, ZB-H1, ZB-H2, ZB-V and DualPipeV.

Imported by ``stagewise.schedules`` so that ``build("zb-h1", ...)`` and the CLI find them.
The searched schedule ``auto`` needs the simulator, so :mod:`stagewise.search` registers it
(``import stagewise`` imports that package).
"""

from __future__ import annotations

from stagewise.schedules.dualpipe import dualpipe_v
from stagewise.schedules.looped_bfs import looped_bfs
from stagewise.schedules.registry import Generator, register
from stagewise.schedules.zbv import zb_v
from stagewise.schedules.zero_bubble import zb_h1, zb_h2

__all__ = ["GENERATORS"]


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
        ops=3,
    ),
    Generator(
        "zb-h2",
        lambda p, m, v: zb_h2(p, m),
        "zero bubble H2: longer warm-up, about 2x memory, per-rank bubble (p-1)(F+I-2W)",
        ops=3,
    ),
    Generator(
        "zb-v",
        lambda p, m, v: zb_v(p, m),
        "zero bubble V: two chunks per rank in a V, p units of memory on every rank",
        default_chunks=2,
        fixed_chunks=2,
        ops=3,
    ),
    Generator(
        "dualpipev",
        lambda p, m, v: dualpipe_v(p, m),
        "DeepSeek DualPipeV: V placement, overlapped F&B pairs (as consecutive actions)",
        default_chunks=2,
        fixed_chunks=2,
        ops=3,  # some backwards split into I and W
    ),
)

for _generator in GENERATORS:
    register(_generator)
