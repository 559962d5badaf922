"""The pipeline part of a plan, from real stagewise schedules and the stagewise simulator.

:class:`PipelineCache` builds each schedule once (``stagewise.schedules.build``), reads peak
activation memory from its :class:`~stagewise.sim.Timeline`, and runs
:func:`stagewise.sim.simulate` with the plan's per-stage costs. A search evaluates thousands of
plans that share a few pipeline shapes, so simulations are cached by (schedule, p, m, v, cost
ratios): the costs are divided by the mean stage forward and rounded to two decimals
(hops to three), then the result is scaled back. One cache lives for one search; nothing is
kept between calls.

Point-to-point costs differ per stage boundary (inside a node or across nodes), so each
boundary's transfer time in seconds is passed as ``send_bytes`` with a link of unit bandwidth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from stagewise.schedules import Op, Schedule, build
from stagewise.sim import Bubble, Costs, Link, Timeline, simulate

__all__ = ["PipelineCache", "PipelineRun"]


@dataclass(frozen=True)
class PipelineRun:
    """One simulated pipeline step, in seconds.

    Attributes:
        makespan: first action's start to last action's end.
        busy: compute time of each rank.
        bubble: the bubble fraction both ways (from the timeline).
        stage_done: per stage, when its last gradient op ends (its gradients are complete).
    """

    makespan: float
    busy: tuple[float, ...]
    bubble: Bubble
    stage_done: tuple[float, ...]


class PipelineCache:
    """Schedules, per-rank timelines and simulations, built once per distinct shape."""

    def __init__(self) -> None:
        self._schedules: dict[tuple[str, int, int, int], Schedule] = {}
        self._rank_timelines: dict[tuple[str, int, int, int, int], Timeline] = {}
        self._runs: dict[tuple[object, ...], PipelineRun] = {}
        self.simulations = 0

    def schedule(self, name: str, p: int, m: int, v: int) -> Schedule:
        """The validated schedule ``name`` for p ranks, m micro-batches, v chunks per rank."""
        key = (name, p, m, v)
        if key not in self._schedules:
            self._schedules[key] = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
        return self._schedules[key]

    def _rank_timeline(self, name: str, p: int, m: int, v: int, rank: int) -> Timeline:
        """Unit-cost timeline of ``rank``'s events only (its memory depends on nothing else)."""
        key = (name, p, m, v, rank)
        if key not in self._rank_timelines:
            full = simulate(self.schedule(name, p, m, v))
            for r in range(p):
                self._rank_timelines[(name, p, m, v, r)] = replace(
                    full, events=full.rank_events(r)
                )
        return self._rank_timelines[key]

    def peak_activation_bytes(
        self, name: str, p: int, m: int, v: int, rank: int, stage_bytes: Sequence[float]
    ) -> float:
        """Peak live activation bytes of ``rank`` given one micro-batch's bytes per stage."""
        timeline = replace(
            self._rank_timeline(name, p, m, v, rank),
            activation_bytes=tuple(float(x) for x in stage_bytes),
        )
        return timeline.peak_activations(rank, in_bytes=True)

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

        def norm(values: Sequence[float], digits: int) -> tuple[float, ...]:
            return tuple(round(x / ref, digits) for x in values)

        f, b, w, h = norm(forward, 2), norm(backward, 2), norm(weight, 2), norm(hops, 3)
        w = tuple(min(wi, bi) for wi, bi in zip(w, b, strict=True))
        key = (name, p, m, v, f, b, w, h)
        if key not in self._runs:
            self._runs[key] = self._simulate(name, p, m, v, f, b, w, h)
        unit = self._runs[key]
        return PipelineRun(
            makespan=unit.makespan * ref,
            busy=tuple(x * ref for x in unit.busy),
            bubble=unit.bubble,
            stage_done=tuple(x * ref for x in unit.stage_done),
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
    ) -> PipelineRun:
        self.simulations += 1
        schedule = self.schedule(name, p, m, v)
        costs = Costs.per_stage(forward=f, backward=b, weight=w, send_bytes=h)
        timeline = simulate(schedule, costs, Link(latency=0.0, bandwidth=1.0))
        done = [0.0] * schedule.num_stages
        for event in timeline.events:
            if event.op is not Op.F:
                done[event.stage] = max(done[event.stage], event.end - timeline.start)
        return PipelineRun(
            makespan=timeline.makespan,
            busy=tuple(timeline.busy(r) for r in range(p)),
            bubble=timeline.bubble(),
            stage_done=tuple(done),
        )
