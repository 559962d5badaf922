"""The fast simulator and Timeline measures against the plain implementations they replaced.

The references below are the event loop and the activation levels as first written (one
Python step per action, a sort of (time, kind, size) tuples, a running sum). The fast code
must give the same floats, bit for bit, over a grid of schedules, sizes, per-stage costs and
links, including split backward (zb-h1, zb-h2), interleaved and V-shaped (zb-v, dualpipev),
both ways it runs: run by run in Python, and level by level in numpy for wide pipelines.
"""

from __future__ import annotations

import itertools
import random
from itertools import accumulate

import pytest

from stagewise.schedules import Op, Schedule, build, validate
from stagewise.schedules.validate import execution_order
from stagewise.sim import Costs, Event, Link, Timeline, simulate


def reference_events(schedule: Schedule, costs: Costs, link: Link) -> list[Event]:
    """Each action starts when its rank is free and its inputs have arrived; by dict."""
    place = schedule.placement
    hop = [link.transfer_time(costs.send_bytes[s] if costs.send_bytes else 0.0)
           for s in range(schedule.num_stages)]
    forward_end: dict[tuple[int, int], float] = {}
    grad_end: dict[tuple[int, int], float] = {}
    free_at = [0.0] * schedule.num_ranks
    events = []
    for rank, action in execution_order(schedule):
        s, op, j = action
        start = free_at[rank]
        if op is Op.F:
            if s > 0:
                start = max(start, forward_end[s - 1, j] + (hop[s - 1] if place[s - 1] != rank
                                                             else 0.0))
        elif op is Op.W:
            start = max(start, grad_end[s, j])
        else:
            start = max(start, forward_end[s, j])
            if s + 1 < schedule.num_stages:
                start = max(start, grad_end[s + 1, j] + (hop[s] if place[s + 1] != rank
                                                         else 0.0))
        end = start + costs.duration(s, op)
        if op is Op.F:
            forward_end[s, j] = end
        elif op is not Op.W:
            grad_end[s, j] = end
        free_at[rank] = end
        events.append(Event(rank, s, op, j, start, end))
    return events


def reference_levels(timeline: Timeline, rank: int, in_bytes: bool) -> list[float]:
    size = (timeline.activation_bytes if in_bytes
            else [1.0 / timeline.num_chunks] * timeline.num_stages)
    assert size is not None
    row = timeline.rank_events(rank)
    changes = [(e.start, 1, size[e.stage]) for e in row if e.op is Op.F]
    changes += [(e.end, 0, -size[e.stage]) for e in row if e.op in (Op.B, Op.W)]
    changes.sort()
    return [c[0] for c in changes] + list(accumulate(c[2] for c in changes))


CASES = [(name, p, m) for name in ("gpipe", "1f1b", "interleaved-1f1b", "looped-bfs",
                                   "zb-h1", "zb-h2", "zb-v", "dualpipev")
         for p, m in ((1, 1), (2, 4), (3, 7), (4, 8), (4, 12))]


def random_costs(schedule: Schedule, seed: int) -> Costs:
    rng = random.Random(seed)
    n = schedule.num_stages
    backward = [rng.choice([0.0, rng.uniform(0.1, 3.0)]) for _ in range(n)]
    return Costs.per_stage(
        forward=[rng.uniform(0.0, 2.0) for _ in range(n)],
        backward=backward,
        weight=[b * rng.random() for b in backward],
        activation_bytes=[rng.uniform(1.0, 1e9) for _ in range(n)],
        send_bytes=[rng.uniform(0.0, 1e6) for _ in range(n)],
    )


@pytest.fixture(params=["run by run", "level by level"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with each of the simulator's two loops (chosen by the validator's walk,
    :func:`stagewise.schedules.validate.is_wide`)."""
    wide = request.param == "level by level"
    monkeypatch.setattr(validate, "WIDE_RANKS", 1 if wide else 10**9)
    monkeypatch.setattr(validate, "WIDE_ACTIONS", 1)
    return str(request.param)


@pytest.mark.parametrize(("name", "p", "m"), CASES)
def test_same_timeline_as_the_reference(path: str, name: str, p: int, m: int) -> None:
    v = 2 if name in ("interleaved-1f1b", "looped-bfs") and m % p == 0 else None
    try:
        schedule = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
    except Exception as error:  # a size the schedule refuses: nothing to compare
        pytest.skip(str(error))
    assert isinstance(validate.execution(schedule), tuple) == (path == "run by run")
    uniform = Costs.uniform(schedule, activation_bytes=3.0)
    links = (Link(), Link(latency=0.3), Link(latency=0.01, bandwidth=1e6))
    for seed, link in itertools.product(range(3), links):
        costs = uniform if seed == 0 else random_costs(schedule, seed)
        timeline = simulate(schedule, costs, link)
        expected = reference_events(schedule, costs, link)
        assert list(timeline.events) == expected  # exact floats, same order
        assert all(type(e.start) is float and type(e.end) is float for e in timeline.events)
        for rank in range(p):
            assert [e for e in timeline.rank_events(rank)] == sorted(
                (e for e in expected if e.rank == rank), key=lambda e: (e.start, e.end))
            for in_bytes in (False, True):
                times_levels = reference_levels(timeline, rank, in_bytes)
                steps = timeline.live_activations(rank, in_bytes=in_bytes)[1:]
                assert [t for t, _ in steps] + [lv for _, lv in steps] == times_levels
                peak = max([0.0, *times_levels[len(times_levels) // 2:]])
                assert timeline.peak_activations(rank, in_bytes=in_bytes) == peak


def test_the_target_size_matches_the_reference(path: str) -> None:
    schedule = build("interleaved-1f1b", num_ranks=8, num_microbatches=64, num_chunks=4)
    costs = random_costs(schedule, 7)
    timeline = simulate(schedule, costs, Link(latency=0.05))
    assert list(timeline.events) == reference_events(schedule, costs, Link(latency=0.05))
    assert [s.peak_activations for s in timeline.rank_stats()] == [
        max([0.0, *reference_levels(timeline, r, False)[timeline_changes(timeline, r):]])
        for r in range(8)]


def timeline_changes(timeline: Timeline, rank: int) -> int:
    """How many level changes ``rank`` has (F, B and W events)."""
    return sum(e.op is not Op.I for e in timeline.rank_events(rank))


def test_a_wide_pipeline_times_the_same_both_ways() -> None:
    """At a size the validator walks round by round on its own (is_wide), the level-by-level
    timeline equals the run-by-run one of the same rows, event for event."""
    wide = build("interleaved-1f1b", num_ranks=32, num_microbatches=64, num_chunks=2)
    assert validate.is_wide(wide)
    assert not isinstance(validate.execution(wide), tuple)
    narrow = Schedule(wide.name, wide.num_ranks, wide.num_stages, wide.num_microbatches,
                      wide.placement, wide.actions)
    narrow._derived["execution"], _ = validate._walk(narrow)  # the run-by-run walk's runs
    costs = random_costs(wide, 3)
    link = Link(latency=0.02, bandwidth=1e5)
    by_level, by_run = simulate(wide, costs, link), simulate(narrow, costs, link)
    assert [by_level.rank_events(r) for r in range(32)] == [
        by_run.rank_events(r) for r in range(32)]
    assert by_level.bubble() == by_run.bubble()
    assert by_level.rank_stats() == by_run.rank_stats()
    assert list(by_level.events) == reference_events(wide, costs, link)
