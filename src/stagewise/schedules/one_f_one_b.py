"""1F1B: one forward, one backward (PipeDream-Flush; Narayanan et al. 2021).

Rank r holds stage r. It runs w = min(p - r - 1, m) warm-up forwards, then alternates one
forward and one backward until the forwards run out, then drains the remaining backwards. The
bubble equals GPipe's, (p - 1)/m of ideal compute, but rank r holds at most min(p - r, m)
micro-batches' activations instead of m. Any m >= 1 works: with m < p the warm-up is capped
at m, so no rank waits for a forward that does not exist.
"""

from __future__ import annotations

from stagewise.schedules._checks import require_positive
from stagewise.schedules.ir import Action, Op, Schedule

__all__ = ["one_f_one_b"]


def one_f_one_b(num_ranks: int, num_microbatches: int) -> Schedule:
    """Build the 1F1B schedule.

    Example:
        >>> print(one_f_one_b(2, 3).table())
        rank  0: 0F0 0F1 0B0 0F2 0B1 0B2
        rank  1: 1F0 1B0 1F1 1B1 1F2 1B2
    """
    require_positive("1f1b", num_ranks=num_ranks, num_microbatches=num_microbatches)
    m = num_microbatches
    rows = []
    for rank in range(num_ranks):
        warmup = min(num_ranks - rank - 1, m)
        row = [Action(rank, Op.F, j) for j in range(warmup)]
        for i in range(m - warmup):
            row.append(Action(rank, Op.F, warmup + i))
            row.append(Action(rank, Op.B, i))
        row.extend(Action(rank, Op.B, j) for j in range(m - warmup, m))
        rows.append(tuple(row))
    return Schedule(
        name="1f1b",
        num_ranks=num_ranks,
        num_stages=num_ranks,
        num_microbatches=m,
        placement=tuple(range(num_ranks)),
        actions=tuple(rows),
    )
