"""ZB-V: the V-shaped zero-bubble schedule (Qi et al., ICLR 2024, section 6).

Notation: p ranks, m micro-batches. The model is cut into 2p stages placed in a V: rank r holds
stage r (its chunk 0, on the way down) and stage 2p - 1 - r (its chunk 1, on the way back), so
rank 0 holds both the first and the last stage. Backwards are split into I (input gradient) and
W (weight gradient). Rank r's row, in phases (the order of torch.distributed.pipelining's
``ScheduleZBVZeroBubble``, written here from its description):

1. 2(p - r) - 1 forwards of chunk 0;
2. r times: a forward of chunk 1, a forward of chunk 0;
3. p - r times: forward, I and W of chunk 1 (the V's bottom turns micro-batches around);
4. steady state, until every forward is placed: [F chunk 0], I and W of chunk 0, then F, I and
   W of chunk 1;
5. r times: I of chunk 0, I of chunk 1 (weights deferred into the drain);
6. p - r times: I of chunk 0 and the oldest deferred W of chunk 0;
7. the remaining W of chunk 1, then of chunk 0.

With F = I and F/2 <= W <= F the only bubble is the fill, p - 1 chunk forwards on every rank
(see :mod:`stagewise.sim.closed_form_zb`), and every rank's live activations peak at 2p chunks
= p stage-micro-batch units (a chunk is half a rank's share): the same on every rank, and the
same as rank 0 of 1F1B. The phases need m >= 2p - 1
micro-batches to fill; for fewer the phases run for 2p - 1 and the actions of micro-batches that
do not exist are left out (still a valid, if bubblier, schedule), so any m >= 1 works.
"""

from __future__ import annotations

from stagewise.schedules._checks import require_positive
from stagewise.schedules._rows import RowBuilder, v_placement
from stagewise.schedules.ir import Action, Op, Schedule

__all__ = ["zb_v"]


def _rank_row(rank: int, num_ranks: int, num_microbatches: int) -> tuple[Action, ...]:
    p = num_ranks
    virtual_m = max(2 * p - 1, num_microbatches)
    down, up = rank, 2 * p - 1 - rank  # chunk 0 and chunk 1 of this rank
    row = RowBuilder(limit=num_microbatches)
    for _ in range(2 * (p - rank) - 1):
        row.add(down, Op.F)
    for _ in range(rank):
        row.add(up, Op.F)
        row.add(down, Op.F)
    for _ in range(p - rank):
        for op in (Op.F, Op.I, Op.W):
            row.add(up, op)
    while row.count(up, Op.F) < row.count(down, Op.F) or row.count(down, Op.F) < virtual_m:
        if row.count(down, Op.F) < virtual_m:
            row.add(down, Op.F)
        row.add(down, Op.I)
        row.add(down, Op.W)
        for op in (Op.F, Op.I, Op.W):
            row.add(up, op)
    for _ in range(rank):
        row.add(down, Op.I)
        row.add(up, Op.I)
    for _ in range(p - rank):
        row.add(down, Op.I)
        row.add(down, Op.W)
    while row.count(up, Op.W) < virtual_m:
        row.add(up, Op.W)
    while row.count(down, Op.W) < virtual_m:
        row.add(down, Op.W)
    return tuple(row.row)


def zb_v(num_ranks: int, num_microbatches: int) -> Schedule:
    """Build ZB-V for ``num_ranks`` ranks (2 chunks each, V placement).

    Raises:
        ScheduleError: a size is not a positive integer.

    Example:
        >>> print(zb_v(1, 2).table())
        rank  0: 0F0 1F0 1I0 1W0 0F1 0I0 0W0 1F1 1I1 1W1 0I1 0W1
    """
    require_positive("zb-v", num_ranks=num_ranks, num_microbatches=num_microbatches)
    return Schedule(
        name="zb-v",
        num_ranks=num_ranks,
        num_stages=2 * num_ranks,
        num_microbatches=num_microbatches,
        placement=v_placement(num_ranks),
        actions=tuple(_rank_row(r, num_ranks, num_microbatches) for r in range(num_ranks)),
    )
