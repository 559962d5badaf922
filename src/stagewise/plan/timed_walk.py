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

from collections import deque
from dataclasses import dataclass

from stagewise.schedules import Op, Schedule, execution_order
from stagewise.sim.simulate import hop_tables

__all__ = ["UnitRun", "idle_and_slack"]

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
) -> UnitRun:
    """Time one step of ``schedule`` with per-stage costs and per-boundary transfer times.

    Raises:
        ScheduleError: the rows cannot all run (from ``execution_order``, naming why).
    """
    walk = _Walk(schedule, forward, backward, weight, hops)
    ready = deque(range(schedule.num_ranks))
    while ready:
        ready.extend(walk.advance(ready.popleft()))
    walk.check()
    makespan = max(walk.free_at)
    return UnitRun(
        idle=tuple(makespan - x for x in walk.busy),
        stage_slack=tuple(makespan - x for x in walk.done),
    )


class _Walk:
    """The state of a timed walk.

    Flat arrays hold when each forward (slot stage + 1) and each input gradient (slot stage)
    ended, at slot * m + micro-batch, with a block of zeros where stage 0 reads its absent
    input and the last stage its absent gradient; :data:`NOT_YET` marks what has not run.
    A rank blocked on a slot waits in ``waiting[key]`` (key: the forward slot, or the
    gradient slot plus the size of a table) until the action filling it runs.
    """

    def __init__(
        self,
        schedule: Schedule,
        forward: tuple[float, ...],
        backward: tuple[float, ...],
        weight: tuple[float, ...],
        hops: tuple[float, ...],
    ) -> None:
        m, num_stages, num_ranks = (
            schedule.num_microbatches, schedule.num_stages, schedule.num_ranks
        )
        self.schedule = schedule
        self.costs = (forward, backward, weight, [x - y for x, y in zip(backward, weight,
                                                                        strict=True)])
        self.hops = hop_tables(schedule.placement, hops)
        self.forward_end = [0.0] * m + [NOT_YET] * (num_stages * m)
        self.grad_end = [NOT_YET] * (num_stages * m) + [0.0] * m
        self.free_at = [0.0] * num_ranks
        self.busy = [0.0] * num_ranks
        self.done = [0.0] * num_stages
        self.position = [0] * num_ranks
        self.waiting: dict[int, list[int]] = {}

    def advance(self, rank: int) -> list[int]:
        """Run ``rank``'s row from where it stopped until it blocks or ends; the ranks that
        its actions woke up."""
        m = self.schedule.num_microbatches
        size = len(self.forward_end)
        forward, backward, weight, inputs = self.costs
        forward_hop, grad_hop = self.hops
        forward_end, grad_end, done, waiting = (
            self.forward_end, self.grad_end, self.done, self.waiting
        )
        op_f, op_w, op_b = Op.F, Op.W, Op.B
        row, k = self.schedule.actions[rank], self.position[rank]
        end_k = len(row)
        start_at, spent = self.free_at[rank], self.busy[rank]
        woken: list[int] = []
        while k < end_k:
            stage, op, j = row[k]
            here = stage * m + j
            if op is op_f:
                t = forward_end[here]
                if t < 0.0:
                    waiting.setdefault(here, []).append(rank)
                    break
                t += forward_hop[stage]
                start = start_at if start_at >= t else t
                end = forward_end[here + m] = start + forward[stage]
                key = here + m
            elif op is op_w:
                t = grad_end[here]
                if t < 0.0:
                    waiting.setdefault(size + here, []).append(rank)
                    break
                start = start_at if start_at >= t else t
                end = done[stage] = start + weight[stage]
                key = -1
            else:
                t, g = forward_end[here + m], grad_end[here + m]
                if t < 0.0 or g < 0.0:
                    waiting.setdefault(here + m if t < 0.0 else size + here + m, []).append(rank)
                    break
                start = start_at if start_at >= t else t
                t = g + grad_hop[stage]
                if t > start:
                    start = t
                end = grad_end[here] = start + (backward[stage] if op is op_b else inputs[stage])
                done[stage] = end  # a stage's actions run in order on its rank: the latest
                key = size + here
            spent += end - start
            start_at = end
            k += 1
            if key in waiting:
                woken.extend(waiting.pop(key))
        self.position[rank], self.free_at[rank], self.busy[rank] = k, start_at, spent
        return woken

    def check(self) -> None:
        """Hand a schedule whose rows did not all run, or that left a forward or gradient
        unrun, to ``execution_order``, which names the fault."""
        rows = self.schedule.actions
        stuck = any(k < len(row) for k, row in zip(self.position, rows, strict=True))
        if stuck or NOT_YET in self.forward_end or NOT_YET in self.grad_end:
            execution_order(self.schedule)  # raises ScheduleError
