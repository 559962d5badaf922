"""GPipe: every forward, then every backward (Huang et al. 2019).

Rank r holds stage r. It runs F0..F(m-1), then B0..B(m-1); with p ranks and m micro-batches
the step takes (m + p - 1) forward+backward slots, and rank r keeps all m micro-batches'
activations alive at the turn.
"""

from __future__ import annotations

from stagewise.schedules._checks import require_positive
from stagewise.schedules.ir import Action, Op, Schedule

__all__ = ["gpipe"]


def gpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """Build the GPipe schedule for ``num_ranks`` ranks and ``num_microbatches`` micro-batches.

    Example:
        >>> print(gpipe(2, 2).table())
        rank  0: 0F0 0F1 0B0 0B1
        rank  1: 1F0 1F1 1B0 1B1
    """
    require_positive("gpipe", num_ranks=num_ranks, num_microbatches=num_microbatches)
    rows = []
    for rank in range(num_ranks):
        forwards = [Action(rank, Op.F, j) for j in range(num_microbatches)]
        backwards = [Action(rank, Op.B, j) for j in range(num_microbatches)]
        rows.append(tuple(forwards + backwards))
    return Schedule(
        name="gpipe",
        num_ranks=num_ranks,
        num_stages=num_ranks,
        num_microbatches=num_microbatches,
        placement=tuple(range(num_ranks)),
        actions=tuple(rows),
    )
