"""The pipeline part of a plan, from real stagewise schedules and the stagewise simulator.

:class:`PipelineCache` builds each schedule it needs once (the registry's generators), reads
peak activation memory from its rows or a closed form, and times it as
:func:`stagewise.sim.simulate` would with the plan's per-stage costs. A search evaluates
thousands of plans that share a few pipeline shapes, so simulations are cached by (schedule, p,
m, v, cost ratios): each stage's forward and backward divided by the mean stage forward and
snapped to a 2 % geometric grid (the weight-gradient part to 5 %, and only for schedules that
run W on its own), and each boundary's transfer time in steps of 2 % of a mean forward. Only
the idle time of each rank is taken from the cached simulation; each rank's busy time is summed
exactly from the plan's own costs, so the rounding touches the bubble alone. One cache lives
for one search; nothing is kept between calls, and the search releases the schedules (the bulk
of its memory) when it returns.

Peak activation memory depends only on the order of each rank's actions
(:mod:`stagewise.plan.live_counts`): counts kept per shape, from closed forms where they hold
(so a shape that is never simulated is never built), else walked from the built schedule.

A search sizes thousands of plans but times few, so schedules are generated without the
validator. A simulation times the rows while it walks them (:mod:`stagewise.plan.timed_walk`),
so no separate execution order is built; rows that cannot all run go to the validator, which
raises naming the fault.

Point-to-point costs differ per stage boundary (inside a node or across nodes), so each
boundary's transfer time in seconds is passed as ``send_bytes`` with a link of unit bandwidth.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

from stagewise.plan.live_counts import (
    SINGLE_STAGE_LIVE,
    V_SHAPED_LIVE,
    LiveCounts,
    closed_form,
    counted,
    peak,
)
from stagewise.plan.timed_walk import UnitRun as _UnitRun
from stagewise.plan.timed_walk import idle_and_slack as _idle_and_slack
from stagewise.plan.timed_walk import idle_and_slack_in_order
from stagewise.schedules import Action, Schedule, build, get
from stagewise.schedules._gc import paused_gc
from stagewise.sim import Bubble

__all__ = ["PipelineCache", "PipelineRun"]

T = TypeVar("T")


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
        self._live: dict[tuple[str, int, int, int], LiveCounts] = {}
        self._live_exact: dict[tuple[str, int, int, int], LiveCounts] = {}
        self._runs: dict[tuple[object, ...], _UnitRun] = {}
        self._splits: dict[tuple[str, int, int], bool] = {}
        self._placements: dict[tuple[str, int, int, int], tuple[int, ...]] = {}
        self._memo: dict[tuple[object, ...], object] = {}
        self._orders: dict[tuple[str, int, int, int], list[Action]] = {}
        self._context: tuple[object, ...] = ()
        self.simulations = 0

    def bind(self, context: tuple[object, ...]) -> None:
        """Key :meth:`memo` to ``context`` (the model, cluster, training and constants of a
        search): a different context (compared by identity) forgets what was memoised."""
        if len(context) != len(self._context) or any(
            a is not b for a, b in zip(context, self._context, strict=False)
        ):
            self._memo.clear()
            self._context = context

    def memo(self, key: tuple[object, ...], make: Callable[[], T]) -> T:
        """``make()``, computed once per ``key`` while the context (see :meth:`bind`) holds.

        The planner keeps here what depends on only part of a configuration (per-stage
        costs, rank sizes), keyed by exactly the knobs it reads, so plans that differ in
        other knobs share it. The first element of a key names the quantity.
        """
        if key not in self._memo:
            self._memo[key] = make()
        return cast(T, self._memo[key])

    def schedule(self, name: str, p: int, m: int, v: int) -> Schedule:
        """The schedule ``name`` for p ranks, m micro-batches, v chunks per rank (not
        validated: a simulation refuses rows that cannot all run)."""
        key = (name, p, m, v)
        if key not in self._schedules:
            generator = get(name)
            if generator.fixed_chunks is not None and v != generator.fixed_chunks:
                build(name, num_ranks=p, num_microbatches=m, num_chunks=v)  # raises, says why
            with paused_gc():  # many small tuples, no cycles (a search pauses it throughout)
                self._schedules[key] = generator.make(p, m, v)
        return self._schedules[key]

    def release_schedules(self) -> None:
        """Forget the schedules built and the execution orders walked (the bulk of a search's
        memory: every action of every shape); what was read from them is kept, and a later
        simulation that needs one builds it again."""
        self._schedules.clear()
        self._orders.clear()

    def splits_backward(self, name: str, p: int, m: int, v: int) -> bool:
        """Whether the schedule runs I and W apart (its weight gradients can fill bubbles).

        A generator of two actions per stage and micro-batch never does; the others are
        asked once per (p, v), at the first m wanted (whether a schedule splits its backward
        does not depend on m: tests/test_plan_pipeline_cache.py).
        """
        if get(name).ops == 2:
            return False
        if name in V_SHAPED_LIVE:  # both split at every size (tests)
            return True
        key = (name, p, v)
        if key not in self._splits:
            self._splits[key] = self.schedule(
                name, p, reduced_microbatches(p, m, name)[0], v
            ).splits_backward
        return self._splits[key]

    def _live_points(self, name: str, p: int, m: int, v: int) -> LiveCounts:
        """Undominated live counts of every rank; a rank's are computed at m1 and m2 (see
        :func:`reduced_microbatches`) and kept when they agree (the schedule's in-flight
        counts have saturated, as for 1F1B-like schedules), at m itself otherwise (GPipe
        keeps all m)."""
        key = (name, p, m, v)
        if key not in self._live:
            m1, m2 = reduced_microbatches(p, m, name)
            first = self._live_at(name, p, m1, v)
            if m2 != m1:
                second = self._live_at(name, p, m2, v)
                if first.points != second.points:
                    full = self._live_at(name, p, m, v)
                    first = LiveCounts(first.stages, tuple(
                        a if a == b else c
                        for a, b, c in zip(first.points, second.points, full.points, strict=True)
                    ))
            self._live[key] = first
        return self._live[key]

    def stages(self, name: str, p: int, m: int, v: int) -> tuple[tuple[int, ...], ...]:
        """The stages of every rank (the same for every m; no schedule is built when each
        rank holds one stage, stage r on rank r)."""
        if name in SINGLE_STAGE_LIVE:
            return tuple((r,) for r in range(p))
        return self._live_at(name, p, reduced_microbatches(p, m, name)[0], v).stages

    def placement(self, name: str, p: int, m: int, v: int) -> tuple[int, ...]:
        """The rank of every stage (see :meth:`stages`)."""
        key = (name, p, m, v)
        if key not in self._placements:
            result = [0] * (p * v)
            for rank, stages in enumerate(self.stages(name, p, m, v)):
                for stage in stages:
                    result[stage] = rank
            self._placements[key] = tuple(result)
        return self._placements[key]

    def _live_at(self, name: str, p: int, m: int, v: int) -> LiveCounts:
        key = (name, p, m, v)
        if key not in self._live_exact:
            live = closed_form(name, p, m, v)
            self._live_exact[key] = live or counted(self.schedule(name, p, m, v))
        return self._live_exact[key]

    def peak_activation_bytes(
        self, name: str, p: int, m: int, v: int, rank: int, stage_bytes: Sequence[float]
    ) -> float:
        """Peak live activation bytes of ``rank`` given one micro-batch's bytes per stage."""
        live = self._live_points(name, p, m, v)
        return peak(live.stages[rank], live.points[rank], stage_bytes)

    def peak_activation_bytes_by_rank(
        self, name: str, p: int, m: int, v: int, stage_bytes: Sequence[float]
    ) -> list[float]:
        """:meth:`peak_activation_bytes` of every rank, in rank order."""
        live = self._live_points(name, p, m, v)
        return [
            peak(stages, points, stage_bytes)
            for stages, points in zip(live.stages, live.points, strict=True)
        ]

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
        busy = tuple(
            m * sum(forward[s] + backward[s] for s in stages)
            for stages in self.stages(name, p, m, v)
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
        if any(y < x for x, y in zip(runs[0].idle, runs[1].idle, strict=True)):
            # Idle time that falls with m has not reached its steady state: simulate m itself.
            key = (name, p, m, v, *costs)
            if key not in self._runs:
                self._runs[key] = self._simulate(name, p, m, v, *costs)
            return self._runs[key]
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
        schedule, key = self.schedule(name, p, m, v), (name, p, m, v)
        if key in self._orders:  # walked before: time it along the order that walk took
            return idle_and_slack_in_order(schedule, self._orders[key], f, b, w, h)
        order: list[Action] = []
        run = _idle_and_slack(schedule, f, b, w, h, order)
        self._orders[key] = order
        return run


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
