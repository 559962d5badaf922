"""The pipeline part of a plan, from real stagewise schedules and the stagewise simulator.

:class:`PipelineCache` builds each schedule once (``stagewise.schedules.build``), reads peak
activation memory from its :class:`~stagewise.sim.Timeline`, and runs
:func:`stagewise.sim.simulate` with the plan's per-stage costs. A search evaluates thousands of
plans that share a few pipeline shapes, so simulations are cached by (schedule, p, m, v, cost
ratios): each stage's forward and backward divided by the mean stage forward and snapped to a
2 % geometric grid (the weight-gradient part to 5 %, and only for schedules that run W on its
own), and each boundary's transfer time in steps of 2 % of a mean forward. Only the idle time
of each rank is taken from the cached simulation; each rank's busy time is summed exactly from
the plan's own costs, so the rounding touches the bubble alone. One cache lives for one search;
nothing is kept between calls.

Peak activation memory depends only on the order of each rank's actions, not on the costs.
For every rank the cache keeps, from a timeline of that rank's actions in schedule order
(what any simulation of the schedule gives the rank, minus the waits), the count of live
micro-batches
of each of its stages at every change point (``Timeline.live_activations`` with one stage
weighted at a time), pruned to the points no other point dominates; a plan's peak bytes is
the largest weighted sum over them, exactly what ``peak_activations(in_bytes=True)`` returns.

Point-to-point costs differ per stage boundary (inside a node or across nodes), so each
boundary's transfer time in seconds is passed as ``send_bytes`` with a link of unit bandwidth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from stagewise.schedules import Op, Schedule, build
from stagewise.sim import Bubble, Costs, Event, Link, Timeline, simulate

__all__ = ["PipelineCache", "PipelineRun"]


@dataclass(frozen=True)
class PipelineRun:
    """One simulated pipeline step, in seconds.

    Attributes:
        makespan: first action's start to last action's end.
        busy: compute time of each rank.
        bubble: the bubble fraction both ways (from the timeline).
        stage_slack: per stage, how long before the end of the step its last gradient op
            ends (from then on its gradients are complete and can be reduced).
    """

    makespan: float
    busy: tuple[float, ...]
    bubble: Bubble
    stage_slack: tuple[float, ...]


class PipelineCache:
    """Schedules, per-rank timelines and simulations, built once per distinct shape."""

    def __init__(self) -> None:
        self._schedules: dict[tuple[str, int, int, int], Schedule] = {}
        self._live: dict[tuple[str, int, int, int], list[list[tuple[float, ...]]]] = {}
        self._runs: dict[tuple[object, ...], _UnitRun] = {}
        self.simulations = 0

    def schedule(self, name: str, p: int, m: int, v: int) -> Schedule:
        """The validated schedule ``name`` for p ranks, m micro-batches, v chunks per rank."""
        key = (name, p, m, v)
        if key not in self._schedules:
            self._schedules[key] = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
        return self._schedules[key]

    def _live_points(self, name: str, p: int, m: int, v: int, rank: int) -> list[tuple[float, ...]]:
        key = (name, p, m, v)
        if key not in self._live:
            schedule = self.schedule(name, p, m, v)
            self._live[key] = [
                _live_counts(_rank_order_timeline(schedule, r), r, schedule.stages_of(r))
                for r in range(p)
            ]
        return self._live[key][rank]

    def peak_activation_bytes(
        self, name: str, p: int, m: int, v: int, rank: int, stage_bytes: Sequence[float]
    ) -> float:
        """Peak live activation bytes of ``rank`` given one micro-batch's bytes per stage."""
        stages = self.schedule(name, p, m, v).stages_of(rank)
        weights = [stage_bytes[s] for s in stages]
        return max(
            (sum(c * w for c, w in zip(point, weights, strict=True))
             for point in self._live_points(name, p, m, v, rank)),
            default=0.0,
        )

    def run(
        self,
        name: str,
        p: int,
        m: int,
        v: int,
        forward: Sequence[float],
        backward: Sequence[float],
        weight: Sequence[float],
        hops: Sequence[float],
    ) -> PipelineRun:
        """Simulate one step with per-stage costs and per-boundary transfer times (seconds)."""
        ref = sum(forward) / len(forward)
        f, b = _grid(forward, ref), _grid(backward, ref)
        if self.schedule(name, p, m, v).splits_backward:
            w = tuple(min(x, y) for x, y in zip(_grid(weight, ref, WEIGHT_GRID), b, strict=True))
        else:  # W never runs on its own: its share cannot change the timeline
            w = tuple(x / 2 for x in b)
        h = tuple(round(x / ref / HOP_STEP) * HOP_STEP for x in hops)
        key = (name, p, m, v, f, b, w, h)
        if key not in self._runs:
            self._runs[key] = self._simulate(name, p, m, v, f, b, w, h)
        unit = self._runs[key]
        schedule = self.schedule(name, p, m, v)
        busy = tuple(
            m * sum(forward[s] + backward[s] for s in schedule.stages_of(r)) for r in range(p)
        )
        makespan = max(busy[r] + unit.idle[r] * ref for r in range(p))
        total = p * makespan
        idle = total - sum(busy)
        return PipelineRun(
            makespan=makespan,
            busy=busy,
            bubble=Bubble(of_step=idle / total, vs_ideal=idle / sum(busy)),
            stage_slack=tuple(x * ref for x in unit.stage_slack),
        )

    def _simulate(
        self,
        name: str,
        p: int,
        m: int,
        v: int,
        f: tuple[float, ...],
        b: tuple[float, ...],
        w: tuple[float, ...],
        h: tuple[float, ...],
    ) -> _UnitRun:
        self.simulations += 1
        schedule = self.schedule(name, p, m, v)
        costs = Costs.per_stage(forward=f, backward=b, weight=w, send_bytes=h)
        timeline = simulate(schedule, costs, Link(latency=0.0, bandwidth=1.0))
        done = [0.0] * schedule.num_stages
        for event in timeline.events:
            if event.op is not Op.F:
                done[event.stage] = max(done[event.stage], event.end - timeline.start)
        return _UnitRun(
            idle=tuple(timeline.idle(r) for r in range(p)),
            stage_slack=tuple(timeline.makespan - x for x in done),
        )


@dataclass(frozen=True)
class _UnitRun:
    idle: tuple[float, ...]
    stage_slack: tuple[float, ...]


GRID = math.log(1.02)
WEIGHT_GRID = math.log(1.05)
HOP_STEP = 0.02  # transfer times in steps of 2 % of a mean stage forward


def _grid(values: Sequence[float], ref: float, step: float = GRID) -> tuple[float, ...]:
    """Each value / ref, snapped to a geometric grid of ``step`` (in log; 0 stays 0)."""
    return tuple(
        math.exp(round(math.log(x / ref) / step) * step) if x > 0 else 0.0 for x in values
    )


def _rank_order_timeline(schedule: Schedule, rank: int) -> Timeline:
    """A timeline of ``rank``'s actions one after another, in its schedule order.

    A rank runs its row in order, so its live activations depend on that order alone: any
    simulated timeline of the schedule gives this rank the same levels, change after change.
    """
    events = tuple(
        Event(rank, action.stage, action.op, action.microbatch, float(i), float(i + 1))
        for i, action in enumerate(schedule.actions[rank])
    )
    return Timeline.of(schedule, events)


def _live_counts(timeline: Timeline, rank: int, stages: Sequence[int]) -> list[tuple[float, ...]]:
    """Live micro-batches of each of ``stages`` at every change point, undominated points only."""
    columns = []
    for stage in stages:
        indicator = tuple(1.0 if s == stage else 0.0 for s in range(timeline.num_stages))
        steps = replace(timeline, activation_bytes=indicator).live_activations(rank, in_bytes=True)
        columns.append([level for _, level in steps])
    points = sorted(set(zip(*columns, strict=True)), reverse=True)
    kept: list[tuple[float, ...]] = []
    for point in points:
        if not any(all(k >= x for k, x in zip(other, point, strict=True)) for other in kept):
            kept.append(point)
    return kept
