"""The event simulator: when each action of a schedule starts and ends, given costs.

Each rank runs its row in order. An action starts when its rank is free and everything it
depends on has finished, plus the link cost when that came from another rank. Transfers do not
occupy the compute stream (they overlap), and links carry any number of transfers at once.
The runtime follows the same rules, so the simulated Timeline is the prediction for a run.
"""

from __future__ import annotations

from itertools import pairwise

from stagewise.errors import ConfigError
from stagewise.schedules._gc import paused_gc
from stagewise.schedules.ir import Op, Schedule
from stagewise.schedules.validate import Runs, execution
from stagewise.sim.costs import Costs, Link
from stagewise.sim.timeline import SimulatedRows, Timeline

__all__ = ["simulate"]


def simulate(schedule: Schedule, costs: Costs | None = None, link: Link | None = None) -> Timeline:
    """Simulate one step of ``schedule``.

    Args:
        schedule: a schedule (it is validated on the way: a deadlock raises ScheduleError).
        costs: per-stage costs; default ``Costs.uniform(schedule)`` (forward 1, backward 2 per
            full rank share).
        link: point-to-point cost between ranks; default free.

    Returns:
        The simulated :class:`Timeline` (``source="simulated"``).

    Example:
        >>> from stagewise.schedules import build
        >>> simulate(build("1f1b", num_ranks=4, num_microbatches=8)).makespan
        33.0
    """
    costs = costs or Costs.uniform(schedule)
    link = link or Link()
    if costs.num_stages != schedule.num_stages:
        raise ConfigError(
            f"costs describe {costs.num_stages} stages but schedule {schedule.name!r} has "
            f"{schedule.num_stages}: give one cost per (virtual) stage"
        )
    hop = [link.transfer_time(costs.send_bytes[s] if costs.send_bytes else 0.0)
           for s in range(schedule.num_stages)]
    forward_hop, grad_hop = hop_tables(schedule.placement, hop)
    with paused_gc():
        found = execution(schedule)
        if isinstance(found, tuple):
            starts, ends = _run(schedule, found, costs, forward_hop, grad_hop)
            columns = SimulatedRows(schedule.actions, starts, ends, runs=found)
        else:  # a wide schedule, walked round by round: timed level by level
            from stagewise.sim._by_level import run_by_level

            start, end = run_by_level(schedule, found, costs, forward_hop, grad_hop)
            cuts, flat = list(pairwise(found.columns.offsets.tolist())), found.columns
            columns = SimulatedRows(
                schedule.actions, [start[a:b] for a, b in cuts], [end[a:b] for a, b in cuts],
                order=found.order, letters=[flat.letter[a:b] for a, b in cuts],
                stages=[flat.stage[a:b] for a, b in cuts])
        return Timeline.of(schedule, (), activation_bytes=costs.activation_bytes,
                           simulated=columns)


def hop_tables(placement: tuple[int, ...],
               hops: list[float] | tuple[float, ...]) -> tuple[list[float], list[float]]:
    """Transfer time into each stage: ``forward_hop[s]`` from stage s - 1, ``grad_hop[s]``
    from stage s + 1, given ``hops[s]``, the time across the boundary after stage s; 0.0
    where both stages share a rank (and at the ends), so every action reads them alike."""
    num_stages = len(placement)
    forward_hop = [0.0] + [hops[s - 1] if placement[s - 1] != placement[s] else 0.0
                           for s in range(1, num_stages)]
    grad_hop = [hops[s] if placement[s + 1] != placement[s] else 0.0
                for s in range(num_stages - 1)] + [0.0]
    return forward_hop, grad_hop


def _run(schedule: Schedule, runs: Runs, costs: Costs, forward_hop: list[float],
         grad_hop: list[float]) -> tuple[list[list[float]], list[list[float]]]:
    """When each action of each rank starts and ends, ``starts[rank][k]`` and ``ends[rank][k]``,
    timed run by run in the validator's execution order (every dependency already timed).
    A rank's row comes out in time order: each action starts once the one before it on the
    rank has ended, and no duration is negative.

    Flat arrays, one slot per (stage, micro-batch) at stage * m + microbatch, hold when each
    forward and each input gradient ended, with one extra block of zeros where stage 0's
    forward reads its (absent) input and the last stage its (absent) gradient. A hop is 0.0
    when both stages share a rank, so every action reads its inputs the same way, no branch.
    """
    m, num_stages = schedule.num_microbatches, schedule.num_stages
    forward, weight = costs.forward, costs.weight
    full = costs.backward
    inputs = [b - w for b, w in zip(full, weight, strict=True)]
    # forward_end[(s + 1) * m + j]: forward of (s, j) ended; block 0 is zeros (stage 0's input).
    forward_end = [0.0] * ((num_stages + 1) * m)
    # grad_end[s * m + j]: B or I of (s, j) ended; the last block is zeros (the loss).
    grad_end = [0.0] * ((num_stages + 1) * m)
    rows = schedule.actions
    starts: list[list[float]] = [[] for _ in rows]
    ends: list[list[float]] = [[] for _ in rows]
    start_appends = [row.append for row in starts]
    end_appends = [row.append for row in ends]
    op_f, op_w, op_b = Op.F, Op.W, Op.B
    for rank, first, stop in runs:
        start_append, end_append = start_appends[rank], end_appends[rank]
        end = ends[rank][-1] if first else 0.0  # when the rank is free
        for stage, op, j in rows[rank][first:stop]:
            here = stage * m + j
            start = end
            if op is op_f:
                t = forward_end[here] + forward_hop[stage]
                if t > start:
                    start = t
                end = forward_end[here + m] = start + forward[stage]
            elif op is op_w:
                t = grad_end[here]
                if t > start:
                    start = t
                end = start + weight[stage]
            else:
                t = forward_end[here + m]
                if t > start:
                    start = t
                t = grad_end[here + m] + grad_hop[stage]
                if t > start:
                    start = t
                end = grad_end[here] = start + (full[stage] if op is op_b else inputs[stage])
            start_append(start)
            end_append(end)
    return starts, ends
