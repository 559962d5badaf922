"""The event simulator: when each action of a schedule starts and ends, given costs.

Each rank runs its row in order. An action starts when its rank is free and everything it
depends on has finished, plus the link cost when that came from another rank. Transfers do not
occupy the compute stream (they overlap), and links carry any number of transfers at once.
The runtime follows the same rules, so the simulated Timeline is the prediction for a run.
"""

from __future__ import annotations

from stagewise.errors import ConfigError
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
    # Flat arrays indexed stage * m + microbatch: when each forward / input-grad finished.
    m, last = schedule.num_microbatches, schedule.num_stages - 1
    placement = schedule.placement
    hop = [
        link.transfer_time(costs.send_bytes[s] if costs.send_bytes else 0.0)
        for s in range(schedule.num_stages)
    ]
    durations = {op: [costs.duration(s, op) for s in range(costs.num_stages)] for op in Op}
    forward_end = [0.0] * (schedule.num_stages * m)
    grad_end = [0.0] * (schedule.num_stages * m)
    free_at = [0.0] * schedule.num_ranks
    events = []
    op_f, op_w = Op.F, Op.W
    make_event = tuple.__new__  # Event(...) without the NamedTuple constructor's overhead
    for rank, (stage, op, j) in execution_order(schedule):
        here = stage * m + j
        ready = free_at[rank]
        if op is op_f:
            if stage > 0:
                t = forward_end[here - m]
                if placement[stage - 1] != rank:
                    t += hop[stage - 1]
                if t > ready:
                    ready = t
        elif op is op_w:
            if grad_end[here] > ready:
                ready = grad_end[here]
        else:
            if forward_end[here] > ready:
                ready = forward_end[here]
            if stage < last:
                t = grad_end[here + m]
                if placement[stage + 1] != rank:
                    t += hop[stage]
                if t > ready:
                    ready = t
        end = ready + durations[op][stage]
        free_at[rank] = end
        if op is op_f:
            forward_end[here] = end
        elif op is not op_w:
            grad_end[here] = end
        events.append(make_event(Event, (rank, stage, op, j, ready, end)))
    return Timeline.of(schedule, events, activation_bytes=costs.activation_bytes)
