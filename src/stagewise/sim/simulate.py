"""The event simulator: when each action of a schedule starts and ends, given costs.

Each rank runs its row in order. An action starts when its rank is free and everything it
depends on has finished, plus the link cost when that came from another rank. Transfers do not
occupy the compute stream (they overlap), and links carry any number of transfers at once.
The runtime follows the same rules, so the simulated Timeline is the prediction for a run.
"""

from __future__ import annotations

from stagewise.errors import ConfigError
from stagewise.schedules._gc import paused_gc
from stagewise.schedules.ir import Op, Schedule
from stagewise.schedules.validate import execution_order
from stagewise.sim.costs import Costs, Link
from stagewise.sim.timeline import Event, Timeline

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
    with paused_gc():
        events, rows = _run(schedule, costs, link)
        return Timeline.of(schedule, events, activation_bytes=costs.activation_bytes, rows=rows)


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


def _run(schedule: Schedule, costs: Costs, link: Link) -> tuple[list[Event], list[list[Event]]]:
    """The events, in the validator's execution order (every dependency already timed), and
    the same events by rank. A rank's row comes out in time order: each action starts once
    the one before it on the rank has ended, and no duration is negative.

    Flat arrays, one slot per (stage, micro-batch) at stage * m + microbatch, hold when each
    forward and each input gradient ended, with one extra block of zeros where stage 0's
    forward reads its (absent) input and the last stage its (absent) gradient. A hop is 0.0
    when both stages share a rank, so every action reads its inputs the same way, no branch.
    """
    m, num_stages = schedule.num_microbatches, schedule.num_stages
    placement = schedule.placement
    hop = [link.transfer_time(costs.send_bytes[s] if costs.send_bytes else 0.0)
           for s in range(num_stages)]
    forward_hop, grad_hop = hop_tables(placement, hop)
    forward, weight = costs.forward, costs.weight
    full = costs.backward
    inputs = [b - w for b, w in zip(full, weight, strict=True)]
    # forward_end[(s + 1) * m + j]: forward of (s, j) ended; block 0 is zeros (stage 0's input).
    forward_end = [0.0] * ((num_stages + 1) * m)
    # grad_end[s * m + j]: B or I of (s, j) ended; the last block is zeros (the loss).
    grad_end = [0.0] * ((num_stages + 1) * m)
    free_at = [0.0] * schedule.num_ranks
    events: list[Event] = []
    append = events.append
    rows: list[list[Event]] = [[] for _ in range(schedule.num_ranks)]
    row_append = [row.append for row in rows]
    op_f, op_w, op_b = Op.F, Op.W, Op.B
    make_event = tuple.__new__  # Event(...) without the NamedTuple constructor's overhead
    for rank, (stage, op, j) in execution_order(schedule):
        here = stage * m + j
        start = free_at[rank]
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
        free_at[rank] = end
        event = make_event(Event, (rank, stage, op, j, start, end))
        append(event)
        row_append[rank](event)
    return events, rows
