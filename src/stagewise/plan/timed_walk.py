"""One pipeline step timed while its rows are walked: idle time per rank, slack per stage.

:func:`idle_and_slack` follows the rows the way :func:`stagewise.schedules.execution_order`
does (each rank runs its row in order and blocks on the action it waits for) and times each
action as it runs, with the rules, sums and comparisons of :func:`stagewise.sim.simulate`. Any
order that respects the rows and the dependencies gives the same times, so the result is the
simulator's (tested against it) without first building the execution order: a search times
most schedules once, and the separate walk cost as much as the timing.

A schedule that cannot run to the end (a deadlock, an action missing or out of place) is
handed to ``execution_order``, which raises the :class:`~stagewise.errors.ScheduleError`
naming the fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

from stagewise.errors import ScheduleError
from stagewise.schedules import Action, Op, Schedule, execution_order
from stagewise.sim.simulate import hop_tables

__all__ = ["UnitRun", "idle_and_slack", "idle_and_slack_in_order"]

NOT_YET = -1.0  # an end time not reached yet (every real time is >= 0)


@dataclass(frozen=True)
class UnitRun:
    """Each rank's idle time and each stage's slack (time from its last gradient op's end to
    the end of the step), in the units of the costs given."""

    idle: tuple[float, ...]
    stage_slack: tuple[float, ...]


def idle_and_slack(
    schedule: Schedule,
    forward: tuple[float, ...],
    backward: tuple[float, ...],
    weight: tuple[float, ...],
    hops: tuple[float, ...],
    order: list[Action] | None = None,
) -> UnitRun:
    """Time one step of ``schedule`` with per-stage costs and per-boundary transfer times.

    Flat arrays hold when each forward (slot stage + 1) and each input gradient (slot stage)
    ended, at slot * m + micro-batch, with a block of zeros where stage 0 reads its absent
    input and the last stage its absent gradient; :data:`NOT_YET` marks what has not run.
    A rank blocked on a slot waits in ``waiter[key]`` (key: the forward slot, or the
    gradient slot plus the size of a table) until the action filling it runs: one rank at
    most, since only the next stage's rank waits on another rank's slot (two waiters mean
    an action twice or out of place, and the rows then stop and are refused). The actions
    run are appended to ``order`` when given (the schedule's own Action objects, so the
    list allocates nothing per action; each action's rank is its stage's placement): an
    execution order, which :func:`idle_and_slack_in_order` times faster for other costs.

    Raises:
        ScheduleError: the rows cannot all run (from ``execution_order``, naming why).
    """
    m, num_ranks = schedule.num_microbatches, schedule.num_ranks
    forward_hop, grad_hop = hop_tables(schedule.placement, hops)
    inputs = [x - y for x, y in zip(backward, weight, strict=True)]
    forward_end, grad_end, free_at, busy, done = _tables(_placed(schedule))
    size, ready, waiter = len(forward_end), list(range(num_ranks)), [-1] * (2 * len(forward_end))
    # Each rank's actions not yet run, and the one it waits on (None: none, or its row ran).
    rest, blocked = [iter(row) for row in schedule.actions], _nothing_waited(num_ranks)
    record, op_f, op_w, op_b = (order if order is not None else []).append, Op.F, Op.W, Op.B
    while ready:
        rank = ready.pop()  # any order of the ready ranks gives the same times
        start_at, spent, waited = free_at[rank], busy[rank], blocked[rank]
        for action in rest[rank] if waited is None else chain((waited,), rest[rank]):
            stage, op, j = action
            here = stage * m + j
            if op is op_f:
                t = forward_end[here]
                if t < 0.0:
                    waiter[here] = rank
                    break
                t += forward_hop[stage]
                start = start_at if start_at >= t else t
                key = here + m
                end = forward_end[key] = start + forward[stage]
            elif op is op_w:
                t = grad_end[here]
                if t < 0.0:
                    waiter[size + here] = rank
                    break
                start = start_at if start_at >= t else t
                end = done[stage] = start + weight[stage]
                key = 0  # waiter[0], forward slot 0 of the absent input: never waited on
            else:
                t, g = forward_end[here + m], grad_end[here + m]
                if t < 0.0 or g < 0.0:
                    waiter[here + m if t < 0.0 else size + here + m] = rank
                    break
                start = start_at if start_at >= t else t
                t = g + grad_hop[stage]
                if t > start:
                    start = t
                end = grad_end[here] = start + (backward[stage] if op is op_b else inputs[stage])
                done[stage] = end  # a stage's actions run in order on its rank: the latest
                key = size + here
            spent, start_at = spent + (end - start), end
            record(action)
            if waiter[key] >= 0:
                ready.append(waiter[key])
                waiter[key] = -1
        else:
            action = None  # the row ran to its end
        blocked[rank], free_at[rank], busy[rank] = action, start_at, spent
    _check_ran(schedule, blocked, forward_end, grad_end)
    return _result(free_at, busy, done)


def idle_and_slack_in_order(
    schedule: Schedule,
    order: list[Action],
    forward: tuple[float, ...],
    backward: tuple[float, ...],
    weight: tuple[float, ...],
    hops: tuple[float, ...],
) -> UnitRun:
    """:func:`idle_and_slack` along an execution order the schedule is known to run in (one
    that walk recorded): the same times, without waiting and waking.

    Each action runs on its stage's rank (as in every registered generator's rows), so an
    action's inputs from its own rank (a B or I's forward, a W's input gradient) ran
    earlier in its row and, no duration being negative, never delay it: only the previous
    stage's forward (for an F) and the next stage's gradient (for a B or I) are read.
    """
    m, placement = schedule.num_microbatches, schedule.placement
    forward_hop, grad_hop = hop_tables(placement, hops)
    inputs = [x - y for x, y in zip(backward, weight, strict=True)]
    forward_end, grad_end, free_at, busy, done = _tables(schedule)
    op_f, op_w, op_b = Op.F, Op.W, Op.B
    for stage, op, j in order:
        here, rank = stage * m + j, placement[stage]
        start = free_at[rank]
        if op is op_f:
            t = forward_end[here] + forward_hop[stage]
            if t > start:
                start = t
            end = forward_end[here + m] = start + forward[stage]
        elif op is op_w:  # its I ran earlier on this rank: it cannot start later
            end = done[stage] = start + weight[stage]
        else:  # its F ran earlier on this rank: only the gradient from the next stage waits
            t = grad_end[here + m] + grad_hop[stage]
            if t > start:
                start = t
            end = grad_end[here] = start + (backward[stage] if op is op_b else inputs[stage])
            done[stage] = end
        busy[rank] += end - start
        free_at[rank] = end
    return _result(free_at, busy, done)


def _tables(schedule: Schedule) -> tuple[list[float], list[float], list[float], list[float],
                                         list[float]]:
    """Forward ends, gradient ends, each rank's free time and busy time, each stage's last
    gradient end."""
    m, num_stages, num_ranks = schedule.num_microbatches, schedule.num_stages, schedule.num_ranks
    return (
        [0.0] * m + [NOT_YET] * (num_stages * m),
        [NOT_YET] * (num_stages * m) + [0.0] * m,
        [0.0] * num_ranks,
        [0.0] * num_ranks,
        [0.0] * num_stages,
    )


def _placed(schedule: Schedule) -> Schedule:
    """``schedule``, once every action is known to sit on its stage's rank (the replay's
    premise); else handed to ``execution_order``, which raises naming the misplaced action."""
    placement = schedule.placement
    for rank, row in enumerate(schedule.actions):
        if any(placement[stage] != rank for stage, _, _ in row):
            execution_order(schedule)  # raises ScheduleError, naming the fault
            raise ScheduleError(f"rank {rank}'s row holds an action of a stage placed on "
                                "another rank: move it to the row of its stage's rank")
    return schedule


def _nothing_waited(num_ranks: int) -> list[Action | None]:
    """Each rank's action waited on: none yet (typed for the walk's assignments)."""
    return [None] * num_ranks


def _result(free_at: list[float], busy: list[float], done: list[float]) -> UnitRun:
    makespan = max(free_at)
    return UnitRun(
        idle=tuple(makespan - x for x in busy),
        stage_slack=tuple(makespan - x for x in done),
    )


def _check_ran(
    schedule: Schedule, blocked: list[Action | None], forward_end: list[float],
    grad_end: list[float],
) -> None:
    """Hand a schedule whose rows did not all run (a rank still waits), or that left a
    forward or gradient unrun, to ``execution_order``, which names the fault."""
    stuck = any(action is not None for action in blocked)
    if stuck or NOT_YET in forward_end or NOT_YET in grad_end:
        execution_order(schedule)  # raises ScheduleError
