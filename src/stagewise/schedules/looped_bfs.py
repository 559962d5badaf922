"""Looped BFS: breadth-first pipeline parallelism over looped chunks (Lamy-Poirier 2022).

Notation: p ranks, m micro-batches, v chunks per rank. Rank r holds stages r, p + r, ...,
(v - 1) p + r (looped placement, as interleaved 1F1B). Where interleaved 1F1B goes depth first
(a few micro-batches through every chunk), looped BFS goes breadth first: rank r runs the
forwards of *all* m micro-batches through its first chunk, then through its second, and so on;
then the backwards chunk by chunk in reverse, each chunk's micro-batches last-to-first (the last
micro-batch's forward is the one that finished most recently, so its backward is ready first).
The order matches torch.distributed.pipelining's ``ScheduleLoopedBFS``, so CSVs agree.

It keeps every micro-batch's activations alive on every chunk (m units on each rank, like
GPipe) and in exchange has the fewest switches between chunks; any m >= 1 works.
"""

from __future__ import annotations

from stagewise.schedules._checks import require_positive
from stagewise.schedules.ir import Action, Op, Schedule

__all__ = ["looped_bfs"]


def looped_bfs(num_ranks: int, num_microbatches: int, num_chunks: int = 2) -> Schedule:
    """Build looped BFS with ``num_chunks`` (v) looped chunks per rank.

    Raises:
        ScheduleError: a size is not a positive integer.

    Example:
        >>> print(looped_bfs(2, 2, 2).table())
        rank  0: 0F0 0F1 2F0 2F1 2B1 2B0 0B1 0B0
        rank  1: 1F0 1F1 3F0 3F1 3B1 3B0 1B1 1B0
    """
    require_positive(
        "looped-bfs",
        num_ranks=num_ranks,
        num_microbatches=num_microbatches,
        num_chunks=num_chunks,
    )
    p, m = num_ranks, num_microbatches
    rows = []
    for rank in range(p):
        stages = [chunk * p + rank for chunk in range(num_chunks)]
        forwards = [Action(s, Op.F, j) for s in stages for j in range(m)]
        backwards = [Action(s, Op.B, j) for s in reversed(stages) for j in reversed(range(m))]
        rows.append(tuple(forwards + backwards))
    return Schedule(
        name="looped-bfs",
        num_ranks=p,
        num_stages=p * num_chunks,
        num_microbatches=m,
        placement=tuple(s % p for s in range(p * num_chunks)),
        actions=tuple(rows),
    )
