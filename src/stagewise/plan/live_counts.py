"""Live activations of each pipeline rank: counted from a schedule's rows, or in closed form.

Peak activation memory depends only on the order of each rank's actions, not on the costs.
For every rank we keep the count of live micro-batches of each of its stages after every
forward (F adds one; B, or W when the backward is split, frees one: the rules of
``Timeline.live_activations``, which any simulation of the schedule follows), pruned to the
points no other point dominates; a plan's peak bytes is the largest weighted sum over them
(:func:`peak`), exactly what ``peak_activations(in_bytes=True)`` returns.

:func:`closed_form` gives these points without building the schedule where the generator's
structure fixes them (1F1B, ZB-H1, ZB-H2 and ZB-V at any m; DualPipeV from m >= 2p, all it
takes; interleaved 1F1B when p divides m), so a search builds only the schedules it simulates.
Every closed form is checked against the built schedules' counts in
tests/test_plan_pipeline_cache.py. Notation: p ranks, m micro-batches, v chunks per rank,
r a rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import ge, mul

from stagewise.schedules import Op, Schedule
from stagewise.sim.closed_form import peak_activations
from stagewise.sim.closed_form_zb import zb_h1_peak_activations, zb_h2_peak_activations

__all__ = [
    "SINGLE_STAGE_LIVE", "V_SHAPED_LIVE", "LiveCounts", "closed_form", "counted", "peak",
    "row_live_counts", "undominated",
]

Points = list[tuple[float, ...]]


@dataclass(frozen=True)
class LiveCounts:
    """Per rank: its stages (increasing), and its undominated live counts (one column per
    stage, largest first)."""

    stages: tuple[tuple[int, ...], ...]
    points: tuple[Points, ...]


# Peak live micro-batches of every rank for schedules that give each rank one stage, as
# functions of (p, m): the simulator's closed forms (1F1B min(p - r, m), ZB-H1 min(m, p)
# and ZB-H2 min(m, 2p - 1) on every rank).
SINGLE_STAGE_LIVE: dict[str, Callable[[int, int], list[float]]] = {
    "1f1b": lambda p, m: peak_activations("1f1b", p, m),
    "zb-h1": lambda p, m: [zb_h1_peak_activations(p, m)] * p,
    "zb-h2": lambda p, m: [zb_h2_peak_activations(p, m)] * p,
}


def _zb_v_live(p: int, m: int, r: int) -> Points:
    """ZB-V's rank r: its warm-up leaves 2p - r - 1 forwards of its first stage and r of
    its second in flight, and the V's bottom one more of the second: the point
    (2p - r - 1, r + 1), each count capped at m (the generator leaves out the actions of
    micro-batches beyond m). When m >= 2p - r the steady state's first forward adds one of
    the first stage as the second's frees one: the point (2p - r, r)."""
    points: set[tuple[float, ...]] = {(float(min(m, 2 * p - r - 1)), float(min(m, r + 1)))}
    if m >= 2 * p - r:
        points.add((2.0 * p - r, float(r)))
    return undominated(points)


# Undominated live counts of the V-shaped schedules, rank r holding stages r and 2p - 1 - r
# (columns in that order), as (the least m they hold for, counts of (p, m, r)). DualPipeV
# refuses m < 2p (its schedule is built then, and raises); its rank r peaks at
# (2p - r, r + 1). Both split their backward at every size (tests).
V_SHAPED_LIVE: dict[str, tuple[Callable[[int], int], Callable[[int, int, int], Points]]] = {
    "zb-v": (lambda p: 1, _zb_v_live),
    "dualpipev": (lambda p: 2 * p, lambda p, m, r: [(2.0 * p - r, r + 1.0)]),
}


def _interleaved_live(p: int, m: int, v: int, r: int) -> Points:
    """Interleaved 1F1B's rank r when p divides m (groups of p micro-batches): its k-th
    forward is of chunk (k // p) mod v, its k-th backward of chunk v - 1 - (k // p) mod v;
    it runs (v - 1) p + 2 (p - r - 1) warm-up forwards, then one forward and one backward
    in turn. The points are the counts after the warm-up and its first steady forward, then
    after every steady forward; after p v steady pairs the counts repeat (each chunk gained
    and lost p), so one period gives every point."""
    total = v * m
    warmup = min(total, (v - 1) * p + 2 * (p - r - 1))
    counts = [0.0] * v
    for k in range(warmup + 1 if total > warmup else warmup):
        counts[(k // p) % v] += 1.0
    points = {tuple(counts)}
    for i in range(1, min(total - warmup - 1, p * v) + 1):
        counts[v - 1 - ((i - 1) // p) % v] -= 1.0
        counts[((warmup + i) // p) % v] += 1.0
        points.add(tuple(counts))
    return undominated(points)


def closed_form(name: str, p: int, m: int, v: int) -> LiveCounts | None:
    """The live counts of schedule ``name`` at (p, m, v) without building it, or None where
    no closed form holds (build the schedule and use :func:`counted`)."""
    if name in SINGLE_STAGE_LIVE:
        peaks = SINGLE_STAGE_LIVE[name](p, m)
        return LiveCounts(tuple((r,) for r in range(p)), tuple([(peak,)] for peak in peaks))
    if name in V_SHAPED_LIVE and v == 2 and m >= V_SHAPED_LIVE[name][0](p):
        v_shaped = V_SHAPED_LIVE[name][1]
        return LiveCounts(
            tuple((r, 2 * p - 1 - r) for r in range(p)),
            tuple(v_shaped(p, m, r) for r in range(p)),
        )
    if name == "interleaved-1f1b" and m % p == 0:  # groups of p: it always runs (tests)
        return LiveCounts(
            tuple(tuple(c * p + r for c in range(v)) for r in range(p)),
            tuple(_interleaved_live(p, m, v, r) for r in range(p)),
        )
    return None


def counted(schedule: Schedule) -> LiveCounts:
    """The live counts of every rank of a built schedule, walked from its rows."""
    ranks = range(schedule.num_ranks)
    return LiveCounts(
        tuple(schedule.stages_of(r) for r in ranks),
        tuple(row_live_counts(schedule, r) for r in ranks),
    )


def row_live_counts(schedule: Schedule, rank: int) -> Points:
    """Live micro-batches of each of ``rank``'s stages after every forward, undominated only.

    F adds one micro-batch of its stage; B, or W when the backward is split, frees one (the
    rules of ``Timeline.live_activations``; a rank runs its row in order). Levels rise only
    at an F, so the points after each F hold every peak; a point followed by another F is
    below the next one, so only the last F of each run of forwards is kept.
    """
    stages = schedule.stages_of(rank)
    column = {stage: i for i, stage in enumerate(stages)}
    counts = [0.0] * len(stages)
    points: set[tuple[float, ...]] = set()
    rising = False  # the last action was an F whose point is not yet recorded
    op_f, op_b, op_w = Op.F, Op.B, Op.W
    for stage, op, _ in schedule.actions[rank]:
        if op is op_f:
            counts[column[stage]] += 1.0
            rising = True
            continue
        if rising:
            points.add(tuple(counts))
            rising = False
        if op is op_b or op is op_w:  # B, or W when split: never both
            counts[column[stage]] -= 1.0
    if rising:
        points.add(tuple(counts))
    return undominated(points) or [tuple(counts)]


def undominated(points: set[tuple[float, ...]]) -> Points:
    """The points no other point dominates (>= in every coordinate), largest first."""
    ordered = sorted(points, reverse=True)
    if ordered and len(ordered[0]) == 1:
        return ordered[:1]
    kept: Points = []
    if ordered and len(ordered[0]) == 2:  # a sweep: the second coordinate must rise
        for point in ordered:
            if not kept or point[1] > kept[-1][1]:
                kept.append(point)
        return kept
    for point in ordered:  # only a point before it (lexicographically larger) can dominate it
        for other in kept:
            if all(map(ge, other, point)):
                break
        else:
            kept.append(point)
    return kept


def peak(stages: tuple[int, ...], points: Points, stage_bytes: Sequence[float]) -> float:
    """The largest weighted sum of a rank's live counts, given one micro-batch's bytes per
    stage (one stage: its largest count, points being largest first)."""
    if len(stages) == 1:
        return points[0][0] * stage_bytes[stages[0]]
    weights = [stage_bytes[s] for s in stages]
    return max((sum(map(mul, point, weights)) for point in points), default=0.0)
