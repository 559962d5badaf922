"""ZB-H1 and ZB-H2: the handcrafted zero-bubble schedules (Qi et al., ICLR 2024, section 3).

Notation: p ranks, m micro-batches, r a rank; rank r holds stage r. The backward is split into
I (gradient for the stage's input, which the previous rank waits for) and W (gradient for the
stage's weights, which nobody waits for), so W can be moved into the bubbles.

**ZB-H1** keeps 1F1B's skeleton: w_r = min(m, p - 1 - r) warm-up forwards, then one forward and
one I per step, then the drain of I's. The W of each micro-batch is *deferred by r steps*: rank
r runs its first r steps without W, then one W per step, and the r W's left over fill its drain.
With W <= F the bubble shrinks from 1F1B's (p - 1)(F + I + W) to (p - 1)(F + I - W). Every
rank keeps at most p micro-batches alive (freed at W), 1F1B's peak (its rank 0).

**ZB-H2** also fills the warm-up bubble: rank r runs w_r = min(m, 2(p - r) - 1) warm-up
forwards (every forward it can run before the first I reaches it), then steps of I, W, F with
the W deferred by 2r steps, and the deferred W's last. Rank r then idles (p - 1 - r)(F + I - 2W)
between its first forward and its last W (rank 0's (p - 1)(F + I - 2W) is the paper's figure),
none at all when F = I = W, for about twice the memory (2p - 1 micro-batches on every rank).
The step, which waits for the slowest rank, still pays the fill: the last rank cannot start
before (p - 1) F.

Both work for every m >= 1 (warm-ups and deferrals are capped at m); ZB-H2 needs m >= 2p - 1
to fill its longer warm-up, and with fewer micro-batches it is slower than ZB-H1. The rules
(warm-up lengths, W deferrals) are chosen so that the simulator reproduces the paper's bubble
formulas; see :mod:`stagewise.sim.closed_form_zb` for the exact conditions.
"""

from __future__ import annotations

from stagewise.schedules._checks import require_positive
from stagewise.schedules.ir import Action, Op, Schedule

__all__ = ["zb_h1", "zb_h2"]


def _zb_h1_row(rank: int, num_ranks: int, m: int) -> tuple[Action, ...]:
    warmup = min(m, num_ranks - 1 - rank)
    row = [Action(rank, Op.F, j) for j in range(warmup)]
    weights = 0
    for k in range(m):
        if warmup + k < m:
            row.append(Action(rank, Op.F, warmup + k))
        row.append(Action(rank, Op.I, k))
        if k >= rank:  # W deferred by r steps
            row.append(Action(rank, Op.W, weights))
            weights += 1
    row.extend(Action(rank, Op.W, j) for j in range(weights, m))
    return tuple(row)


def _zb_h2_row(rank: int, num_ranks: int, m: int) -> tuple[Action, ...]:
    warmup = min(m, 2 * (num_ranks - rank) - 1)
    row = [Action(rank, Op.F, j) for j in range(warmup)]
    weights = 0
    for k in range(m):
        row.append(Action(rank, Op.I, k))
        if k >= 2 * rank:  # W deferred by 2r steps
            row.append(Action(rank, Op.W, weights))
            weights += 1
        if warmup + k < m:
            row.append(Action(rank, Op.F, warmup + k))
    row.extend(Action(rank, Op.W, j) for j in range(weights, m))
    return tuple(row)


def _schedule(name: str, num_ranks: int, m: int, rows: list[tuple[Action, ...]]) -> Schedule:
    return Schedule(
        name=name,
        num_ranks=num_ranks,
        num_stages=num_ranks,
        num_microbatches=m,
        placement=tuple(range(num_ranks)),
        actions=tuple(rows),
    )


def zb_h1(num_ranks: int, num_microbatches: int) -> Schedule:
    """Build ZB-H1: 1F1B with split backwards and W deferred by r steps on rank r.

    Raises:
        ScheduleError: a size is not a positive integer.

    Example:
        >>> print(zb_h1(2, 3).table())
        rank  0: 0F0 0F1 0I0 0W0 0F2 0I1 0W1 0I2 0W2
        rank  1: 1F0 1I0 1F1 1I1 1W0 1F2 1I2 1W1 1W2
    """
    require_positive("zb-h1", num_ranks=num_ranks, num_microbatches=num_microbatches)
    rows = [_zb_h1_row(r, num_ranks, num_microbatches) for r in range(num_ranks)]
    return _schedule("zb-h1", num_ranks, num_microbatches, rows)


def zb_h2(num_ranks: int, num_microbatches: int) -> Schedule:
    """Build ZB-H2: 2(p - r) - 1 warm-up forwards, then I, W, F with W deferred by 2r steps.

    Raises:
        ScheduleError: a size is not a positive integer.

    Example:
        >>> print(zb_h2(2, 4).table())
        rank  0: 0F0 0F1 0F2 0I0 0W0 0F3 0I1 0W1 0I2 0W2 0I3 0W3
        rank  1: 1F0 1I0 1F1 1I1 1F2 1I2 1W0 1F3 1I3 1W1 1W2 1W3
    """
    require_positive("zb-h2", num_ranks=num_ranks, num_microbatches=num_microbatches)
    rows = [_zb_h2_row(r, num_ranks, num_microbatches) for r in range(num_ranks)]
    return _schedule("zb-h2", num_ranks, num_microbatches, rows)
