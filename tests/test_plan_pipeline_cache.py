"""The planner's pipeline cache against full simulations: steady-state extrapolation, memory."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stagewise.plan.live_counts import V_SHAPED_LIVE, closed_form, undominated
from stagewise.plan.live_counts import row_live_counts as _live_counts
from stagewise.plan.pipeline_cache import (
    PipelineCache,
    reduced_microbatches,
)
from stagewise.plan.timed_walk import idle_and_slack
from stagewise.schedules import Op, build
from stagewise.sim import Costs, Link, simulate

# (schedule, p, v): every searched family; even middle stages, heavier first and last ones.
CASES = [("1f1b", 4, 1), ("interleaved-1f1b", 4, 2), ("zb-h1", 4, 1), ("zb-h2", 3, 1),
         ("zb-v", 4, 2), ("dualpipev", 4, 2), ("gpipe", 3, 1)]


def _costs(stages: int) -> tuple[list[float], list[float], list[float], list[float]]:
    forward = [1.0] * stages
    forward[0], forward[-1] = 1.04, 1.3  # embedding; output head and loss
    backward = [2.0 * f for f in forward]
    return forward, backward, [0.9 * f for f in forward], [0.0] * stages


def test_reduced_microbatches_keep_the_residue_mod_p() -> None:
    assert reduced_microbatches(4, 12) == (12, 12)
    assert reduced_microbatches(4, 103) == (11, 15)  # 103 = 11 (mod 4)
    assert reduced_microbatches(4, 103, "dualpipev") == (15, 19)


@pytest.mark.parametrize(("name", "p", "v"), CASES)
@pytest.mark.parametrize("m", [37, 64])
def test_extrapolated_step_matches_the_full_simulation(name: str, p: int, v: int, m: int) -> None:
    forward, backward, weight, hops = _costs(p * v)
    run = PipelineCache().run(name, p, m, v, forward, backward, weight, hops)
    schedule = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
    costs = Costs.per_stage(forward=forward, backward=backward, weight=weight, send_bytes=hops)
    full = simulate(schedule, costs, Link(latency=0.0, bandwidth=1.0))
    # The cache snaps costs to a 2 % grid (only the idle time sees it): 0.1 %; the
    # extrapolation is exact for 1F1B, ZB and DualPipeV; interleaving's within 0.5 %.
    assert run.makespan == pytest.approx(full.makespan, rel=5e-3 if v > 1 else 1e-3)


@pytest.mark.parametrize(("name", "p", "v"), CASES)
def test_peak_activations_match_the_full_schedule(name: str, p: int, v: int) -> None:
    m, cache = 41, PipelineCache()
    schedule = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
    stage_bytes = [float(s + 1) for s in range(p * v)]
    forward, backward, weight, hops = _costs(p * v)
    costs = Costs.per_stage(forward=forward, backward=backward, weight=weight, send_bytes=hops)
    full = replace(simulate(schedule, costs, Link(latency=0.0, bandwidth=1.0)),
                   activation_bytes=tuple(stage_bytes))
    expected = [full.peak_activations(rank, in_bytes=True) for rank in range(p)]
    for rank in range(p):
        assert cache.peak_activation_bytes(name, p, m, v, rank, stage_bytes) == expected[rank]
    assert cache.peak_activation_bytes_by_rank(name, p, m, v, stage_bytes) == expected


@pytest.mark.parametrize("name", ["1f1b", "zb-h1", "zb-h2"])
@pytest.mark.parametrize(("p", "m"), [(1, 1), (2, 1), (3, 2), (4, 4), (4, 9), (5, 23), (8, 31)])
def test_single_stage_closed_forms_match_the_built_schedule(name: str, p: int, m: int) -> None:
    """The cache sizes 1F1B, ZB-H1 and ZB-H2 without building them: the same peaks."""
    stage_bytes = [float(3 * s + 1) for s in range(p)]
    built = PipelineCache()
    schedule = built.schedule(name, p, m, 1)
    for rank in range(p):
        counts = max(point[0] for point in _live_counts(schedule, rank))
        expected = counts * stage_bytes[rank]
        assert PipelineCache().peak_activation_bytes(name, p, m, 1, rank, stage_bytes) == expected
    assert PipelineCache().placement(name, p, m, 1) == schedule.placement


@pytest.mark.parametrize("name", ["zb-v", "dualpipev"])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 5, 8])
def test_v_shaped_closed_forms_match_the_built_schedule(name: str, p: int) -> None:
    """The cache sizes ZB-V and DualPipeV without building them, for every m from the
    least the closed forms hold for (1, 2p) to past the reduced sizes it is asked at:
    the same stages and live counts as the built schedule's, which splits its backward
    (peaks against the simulator's timeline: test_peak_activations_match_the_full_schedule)."""
    first = V_SHAPED_LIVE[name][0](p)
    assert first <= 2 * p  # every m the search reduces to (m1 >= 2p) is covered
    for m in range(first, 6 * p + 2):
        schedule = build(name, num_ranks=p, num_microbatches=m, num_chunks=2)
        cache = PipelineCache()
        live = cache._live_at(name, p, m, 2)
        assert cache._schedules == {}  # nothing built
        assert live.stages == tuple(schedule.stages_of(r) for r in range(p))
        assert live.points == tuple(_live_counts(schedule, r) for r in range(p))
        assert cache.placement(name, p, m, 2) == schedule.placement
        assert cache.splits_backward(name, p, m, 2) is schedule.splits_backward is True


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5, 8])
def test_interleaved_closed_form_matches_the_built_schedule(p: int) -> None:
    """Interleaved 1F1B is sized without building it when p divides m: for every v the
    search takes (2..8) and m = p..8p, it builds (groups of p always run) and its rows give
    the same stages and live counts; other m are left to the built schedule."""
    for v in range(2, 9):
        for m in range(p, 8 * p + 1, p):
            schedule = build("interleaved-1f1b", num_ranks=p, num_microbatches=m, num_chunks=v)
            live = closed_form("interleaved-1f1b", p, m, v)
            assert live is not None
            assert live.stages == tuple(schedule.stages_of(r) for r in range(p))
            assert live.points == tuple(_live_counts(schedule, r) for r in range(p))
    assert closed_form("interleaved-1f1b", 4, 10, 2) is None


@pytest.mark.parametrize(("name", "p", "v"), CASES)
def test_splitting_the_backward_does_not_depend_on_m(name: str, p: int, v: int) -> None:
    cache = PipelineCache()
    splits = {cache.schedule(name, p, m, v).splits_backward for m in (2 * p, 3 * p + 1, 5 * p)}
    assert len(splits) == 1
    assert cache.splits_backward(name, p, 7 * p, v) in splits


@pytest.mark.parametrize(("name", "p", "v"), CASES)
def test_idle_and_slack_equal_the_simulator(name: str, p: int, v: int) -> None:
    """The planner's lean loop gives the simulator's idle times and last gradient ends."""
    m = 3 * p + 1
    forward, backward, weight, _ = _costs(p * v)
    hops = [0.05 * (s % 3) for s in range(p * v)]
    schedule = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
    costs = Costs.per_stage(forward=forward, backward=backward, weight=weight, send_bytes=hops)
    full = simulate(schedule, costs, Link(latency=0.0, bandwidth=1.0))
    got = idle_and_slack(schedule, tuple(forward), tuple(backward), tuple(weight), tuple(hops))
    assert got.idle == pytest.approx([full.idle(r) for r in range(p)], rel=1e-12, abs=1e-9)
    done = [max(e.end for e in full.events if e.stage == s and e.op is not Op.F)
            for s in range(p * v)]
    assert got.stage_slack == pytest.approx([full.makespan - x for x in done], abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5).flatmap(
    lambda d: st.sets(st.tuples(*[st.integers(0, 6).map(float)] * d), min_size=1, max_size=40)
))
def test_undominated_keeps_exactly_the_points_nothing_else_covers(
    points: set[tuple[float, ...]],
) -> None:
    """Against the definition, pair by pair: kept iff no other point is >= in every
    coordinate; largest first."""
    expected = sorted(
        (p for p in points
         if not any(q != p and all(a >= b for a, b in zip(q, p, strict=True)) for q in points)),
        reverse=True,
    )
    assert undominated(points) == expected
