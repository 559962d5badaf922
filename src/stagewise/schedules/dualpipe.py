"""DualPipeV: DeepSeek's DualPipe "cut in half" onto a V placement (DeepSeek-V3 report, 2024).

Notation: p ranks, m micro-batches. As in ZB-V, rank r holds stage r (chunk 0, going down the
V) and stage 2p - 1 - r (chunk 1, coming back up). DualPipe's idea is to overlap the forward
of one chunk with the backward of the other, hiding each one's communication behind the
other's compute. Rank r's row, in DualPipe's numbered phases (the order of the reference
implementation and of torch.distributed.pipelining's ``ScheduleDualPipeV``, written here from
their description):

1. 2(p - r - 1) forwards of chunk 0;
2. r + 1 times: forward of chunk 0, forward of chunk 1;
3. p - r - 1 times: I of chunk 1, the oldest deferred W, forward of chunk 1 (zero-bubble fill);
4. main phase, m - 2p + r + 1 times: overlapped (F chunk 0 with B chunk 1), then overlapped
   (F chunk 1 with B chunk 0); the last rank runs its first pair unoverlapped;
5. p - r - 1 times: B of chunk 1, then overlapped (F chunk 1 with B chunk 0);
6. r + 1 times: backward of chunk 1, backward of chunk 0, switching from full B to split I
   halfway through (W deferred);
7. p - r - 1 times: the oldest deferred W, then a backward of chunk 0;
8. r + 1 times: the oldest deferred W.

**Overlapped pairs.** Our IR has no fused "F and B at once" action, so an overlapped pair is
written as two consecutive actions, the forward first. The simulator therefore runs them one
after the other (their times add), which is what the compute stream does; it does not model the
communication the overlap hides. Phases 4 and 5 are where those pairs are.

The phases need m >= 2p micro-batches (phase 4 runs at least once on rank 0); fewer are refused.
"""

from __future__ import annotations

from stagewise.errors import ScheduleError
from stagewise.schedules._checks import require_positive
from stagewise.schedules._rows import RowBuilder, v_placement
from stagewise.schedules.ir import Action, Op, Schedule

__all__ = ["dualpipe_v"]


def _overlapped(row: RowBuilder, forward_stage: int, backward_stage: int) -> None:
    """An overlapped F&B pair, written as the forward then the full backward."""
    row.add(forward_stage, Op.F)
    row.add(backward_stage, Op.B)


def _rank_row(rank: int, num_ranks: int, num_microbatches: int) -> tuple[Action, ...]:
    p, m = num_ranks, num_microbatches
    down, up = rank, 2 * p - 1 - rank
    row = RowBuilder(limit=m)
    for _ in range(2 * (p - rank - 1)):  # phase 1
        row.add(down, Op.F)
    for _ in range(rank + 1):  # phase 2
        row.add(down, Op.F)
        row.add(up, Op.F)
    for _ in range(p - rank - 1):  # phase 3
        row.add(up, Op.I)
        row.add_pending_weight()
        row.add(up, Op.F)
    for i in range(m - 2 * p + rank + 1):  # phase 4
        if i == 0 and rank == p - 1:
            row.add(down, Op.F)
            row.add(up, Op.B)
        else:
            _overlapped(row, down, up)
        _overlapped(row, up, down)
    for _ in range(p - rank - 1):  # phase 5
        row.add(up, Op.B)
        _overlapped(row, up, down)
    split = False  # phase 6: full backwards first, split ones from the middle on
    half = (rank + 1) // 2
    for i in range(rank + 1):
        split = split or (i == half and rank % 2 == 1)
        row.add(up, Op.I if split else Op.B)
        split = split or (i == half and rank % 2 == 0)
        row.add(down, Op.I if split else Op.B)
    for _ in range(p - rank - 1):  # phase 7
        row.add_pending_weight()
        row.add(down, Op.I if split else Op.B)
    for _ in range(rank + 1):  # phase 8
        row.add_pending_weight()
    return tuple(row.row)


def dualpipe_v(num_ranks: int, num_microbatches: int) -> Schedule:
    """Build DualPipeV for ``num_ranks`` ranks (2 chunks each, V placement).

    Raises:
        ScheduleError: a size is not a positive integer, or m < 2p.

    Example:
        >>> print(dualpipe_v(1, 2).table())
        rank  0: 0F0 1F0 0F1 1B0 1F1 0B0 1B1 0I1 0W1
    """
    require_positive("dualpipev", num_ranks=num_ranks, num_microbatches=num_microbatches)
    if num_microbatches < 2 * num_ranks:
        raise ScheduleError(
            f"dualpipev needs at least 2p = {2 * num_ranks} micro-batches on p={num_ranks} "
            f"ranks, got m={num_microbatches}: use m >= {2 * num_ranks} (or zb-v, which "
            "takes any m)"
        )
    return Schedule(
        name="dualpipev",
        num_ranks=num_ranks,
        num_stages=2 * num_ranks,
        num_microbatches=num_microbatches,
        placement=v_placement(num_ranks),
        actions=tuple(
            _rank_row(r, num_ranks, num_microbatches) for r in range(num_ranks)
        ),
    )
