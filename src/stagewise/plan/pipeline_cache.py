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
For every rank the cache keeps the count of live micro-batches of each of its stages after
every forward (F adds one; B, or W when the backward is split, frees one: the rules of
``Timeline.live_activations``, which any simulation of the schedule follows), pruned to the
points no other point dominates; a plan's peak bytes is the largest weighted sum over them,
exactly what ``peak_activations(in_bytes=True)`` returns.

A search sizes thousands of plans but times few, so schedules are generated without the
validator, which runs (once per schedule) only before a schedule is simulated.

Point-to-point costs differ per stage boundary (inside a node or across nodes), so each
boundary's transfer time in seconds is passed as ``send_bytes`` with a link of unit bandwidth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from stagewise.schedules import Op, Schedule, build, check, get
from stagewise.sim import Bubble, Costs, Link, simulate

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
        self._live: dict[tuple[str, int, int, int, int], list[tuple[float, ...]]] = {}
        self._runs: dict[tuple[object, ...], _UnitRun] = {}
        self._splits: dict[tuple[str, int, int, int], bool] = {}
        self.simulations = 0

    def schedule(self, name: str, p: int, m: int, v: int) -> Schedule:
        """The schedule ``name`` for p ranks, m micro-batches, v chunks per rank (not yet
        validated: :meth:`run` validates it before simulating)."""
        key = (name, p, m, v)
        if key not in self._schedules:
            generator = get(name)
            if generator.fixed_chunks is not None and v != generator.fixed_chunks:
                build(name, num_ranks=p, num_microbatches=m, num_chunks=v)  # raises, says why
            self._schedules[key] = generator.make(p, m, v)
        return self._schedules[key]

    def splits_backward(self, name: str, p: int, m: int, v: int) -> bool:
        """Whether the schedule runs I and W apart (its weight gradients can fill bubbles)."""
        key = (name, p, reduced_microbatches(p, m, name)[0], v)
        if key not in self._splits:
            self._splits[key] = self.schedule(*key).splits_backward
        return self._splits[key]

    def _live_points(self, name: str, p: int, m: int, v: int, rank: int) -> list[tuple[float, ...]]:
        """Undominated live counts of ``rank``; computed at m1 and m2 (see
        :func:`reduced_microbatches`) when they agree (the schedule's in-flight counts have
        saturated, as for 1F1B-like schedules), at m itself otherwise (GPipe keeps all m)."""
        key = (name, p, m, v, rank)
        if key not in self._live:
            m1, m2 = reduced_microbatches(p, m, name)
            first = _live_counts(self.schedule(name, p, m1, v), rank)
            if m2 != m1 and first != _live_counts(self.schedule(name, p, m2, v), rank):
                first = _live_counts(self.schedule(name, p, m, v), rank)
            self._live[key] = first
        return self._live[key]

    def peak_activation_bytes(
        self, name: str, p: int, m: int, v: int, rank: int, stage_bytes: Sequence[float]
    ) -> float:
        """Peak live activation bytes of ``rank`` given one micro-batch's bytes per stage."""
        stages = self.schedule(name, p, reduced_microbatches(p, m, name)[0], v).stages_of(rank)
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
        if self.splits_backward(name, p, m, v):
            w = tuple(min(x, y) for x, y in zip(_grid(weight, ref, WEIGHT_GRID), b, strict=True))
        else:  # W never runs on its own: its share cannot change the timeline
            w = tuple(x / 2 for x in b)
        h = tuple(round(x / ref / HOP_STEP) * HOP_STEP for x in hops)
        unit = self._unit_run(name, p, m, v, (f, b, w, h))
        schedule = self.schedule(name, p, reduced_microbatches(p, m, name)[0], v)
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

    def _unit_run(
        self, name: str, p: int, m: int, v: int, costs: tuple[tuple[float, ...], ...]
    ) -> _UnitRun:
        """Idle time and slack in units of a mean stage forward, for m micro-batches.

        Beyond :func:`reduced_microbatches`' threshold the pipeline is in its steady state,
        whose idle time grows by the same amount with every p more micro-batches: the
        simulations at m1 and m1 + p give it (exactly for 1F1B, ZB and DualPipeV with even
        stages; interleaving's to within 0.5 %).
        """
        m1, m2 = reduced_microbatches(p, m, name)
        runs = []
        for size in dict.fromkeys((m1, m2)):
            key = (name, p, size, v, *costs)
            if key not in self._runs:
                self._runs[key] = self._simulate(name, p, size, v, *costs)
            runs.append(self._runs[key])
        if len(runs) == 1:
            return runs[0]
        scale = (m - m1) / (m2 - m1)
        return _UnitRun(*(
            tuple(x + (y - x) * scale for x, y in zip(first, second, strict=True))
            for first, second in ((runs[0].idle, runs[1].idle),
                                  (runs[0].stage_slack, runs[1].stage_slack))
        ))

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
        check(schedule)  # once per schedule: the result is kept on the schedule
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


# From m > STEADY_FROM x p micro-batches on (p**2 x that many actions at most), simulate two
# smaller m and extrapolate. 2p is past 1F1B's, interleaving's and ZB's warm-up; DualPipeV's
# phases need 3p to reach their steady state (measured against full simulations,
# tests/test_plan_pipeline_cache.py).
STEADY_FROM = {"dualpipev": 3}
DEFAULT_STEADY_FROM = 2


def reduced_microbatches(p: int, m: int, name: str = "") -> tuple[int, int]:
    """The micro-batch counts (m1, m2) simulated for m: (m, m) up to k x p, else m1 in
    [kp, (k+1)p) with m1 = m (mod p), and m2 = m1 + p (k = ``STEADY_FROM`` of ``name``).

    Example:
        >>> reduced_microbatches(4, 12), reduced_microbatches(4, 103)
        ((12, 12), (11, 15))
    """
    k = STEADY_FROM.get(name, DEFAULT_STEADY_FROM)
    if m <= (k + 1) * p:
        return m, m
    m1 = k * p + (m - k * p) % p
    return m1, m1 + p


def _grid(values: Sequence[float], ref: float, step: float = GRID) -> tuple[float, ...]:
    """Each value / ref, snapped to a geometric grid of ``step`` (in log; 0 stays 0)."""
    return tuple(
        math.exp(round(math.log(x / ref) / step) * step) if x > 0 else 0.0 for x in values
    )


def _live_counts(schedule: Schedule, rank: int) -> list[tuple[float, ...]]:
    """Live micro-batches of each of ``rank``'s stages after every forward, undominated only.

    F adds one micro-batch of its stage; B, or W when the backward is split, frees one (the
    rules of ``Timeline.live_activations``; a rank runs its row in order). Levels rise only
    at an F, so the points after each F hold every peak.
    """
    stages = schedule.stages_of(rank)
    column = {stage: i for i, stage in enumerate(stages)}
    counts = [0.0] * len(stages)
    points: set[tuple[float, ...]] = set()
    for action in schedule.actions[rank]:
        if action.op is Op.F:
            counts[column[action.stage]] += 1.0
            points.add(tuple(counts))
        elif action.op is Op.B or action.op is Op.W:  # B, or W when split: never both
            counts[column[action.stage]] -= 1.0
    return _undominated(points) or [tuple(counts)]


def _undominated(points: set[tuple[float, ...]]) -> list[tuple[float, ...]]:
    """The points no other point dominates (>= in every coordinate), largest first."""
    ordered = sorted(points, reverse=True)
    if ordered and len(ordered[0]) == 1:
        return ordered[:1]
    kept: list[tuple[float, ...]] = []
    if ordered and len(ordered[0]) == 2:  # a sweep: the second coordinate must rise
        for point in ordered:
            if not kept or point[1] > kept[-1][1]:
                kept.append(point)
        return kept
    for point in ordered:
        if not any(all(k >= x for k, x in zip(other, point, strict=True)) for other in kept):
            kept.append(point)
    return kept
