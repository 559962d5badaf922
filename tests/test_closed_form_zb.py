"""The zero-bubble closed forms against the simulator, over grids where they hold.

Costs are given per full rank share (F, I, W) and turned into per-stage costs with
Costs.per_stage (B = I + W per stage; a V chunk gets half), independently of the formulas.
"""

from __future__ import annotations

import itertools

import pytest

from stagewise.errors import ConfigError
from stagewise.schedules import Schedule, build
from stagewise.sim import Costs, Timeline, simulate
from stagewise.sim.closed_form_zb import (
    dualpipev_peak_activations,
    zb_h1_bubble,
    zb_h1_makespan,
    zb_h1_peak_activations,
    zb_h2_makespan,
    zb_h2_peak_activations,
    zb_h2_rank_bubble,
    zb_v_bubble,
    zb_v_makespan,
    zb_v_peak_activations,
)

VALUES = (0.5, 1.0, 1.5, 2.0)
TRIPLES = list(itertools.product(VALUES, VALUES, VALUES))


def run(name: str, p: int, m: int, f: float, i: float, w: float) -> Timeline:
    schedule: Schedule = build(name, num_ranks=p, num_microbatches=m)
    n, v = schedule.num_stages, schedule.num_chunks
    costs = Costs.per_stage([f / v] * n, [(i + w) / v] * n, [w / v] * n)
    return simulate(schedule, costs)


def own_span_idle(timeline: Timeline, rank: int) -> float:
    events = timeline.rank_events(rank)
    span = max(e.end for e in events) - min(e.start for e in events)
    return span - timeline.busy(rank)


@pytest.mark.parametrize(("f", "i", "w"), [t for t in TRIPLES if t[2] <= min(t[0], t[1])])
def test_zb_h1_bubble_and_makespan(f: float, i: float, w: float) -> None:
    for p in (1, 2, 3, 4, 6):
        for m in (p, p + 1, 2 * p, 3 * p + 1):
            timeline = run("zb-h1", p, m, f, i, w)
            assert timeline.makespan == pytest.approx(zb_h1_makespan(p, m, f, i, w))
            for rank in range(p):
                assert timeline.idle(rank) == pytest.approx(zb_h1_bubble(p, f, i, w))


@pytest.mark.parametrize(
    ("f", "i", "w"), [t for t in TRIPLES if t[2] <= t[0] and 2 * t[2] <= t[0] + t[1]]
)
def test_zb_h2_rank_bubble_and_makespan(f: float, i: float, w: float) -> None:
    for p in (1, 2, 3, 4, 6):
        for m in (2 * p - 1, 2 * p, 3 * p + 1):
            timeline = run("zb-h2", p, m, f, i, w)
            assert timeline.makespan == pytest.approx(zb_h2_makespan(p, m, f, i, w))
            for rank in range(p):
                assert own_span_idle(timeline, rank) == pytest.approx(
                    zb_h2_rank_bubble(p, f, i, w, rank)
                )


def test_zb_h2_is_gapless_per_rank_with_equal_costs() -> None:
    # the paper's headline: zero bubble inside every rank's span when F = I = W
    timeline = run("zb-h2", 4, 12, 1.0, 1.0, 1.0)
    assert [own_span_idle(timeline, r) for r in range(4)] == [0.0] * 4
    assert zb_h2_rank_bubble(4, 1.0, 1.0, 1.0) == 0.0


@pytest.mark.parametrize(("f", "w"), [(1.0, 0.5), (1.0, 0.75), (1.0, 1.0), (2.0, 1.0), (2.0, 1.5)])
def test_zb_v_bubble_and_makespan(f: float, w: float) -> None:
    for p in (1, 2, 3, 4, 6):
        for m in (2 * p - 1, 2 * p, 3 * p + 1):
            timeline = run("zb-v", p, m, f, f, w)
            assert timeline.makespan == pytest.approx(zb_v_makespan(p, m, f, f, w))
            for rank in range(p):
                assert timeline.idle(rank) == pytest.approx(zb_v_bubble(p, f, f, w))


def test_peak_activations_match_the_simulator() -> None:
    for p in range(1, 7):
        for m in range(1, 4 * p + 2):
            for name, formula in (("zb-h1", zb_h1_peak_activations),
                                  ("zb-h2", zb_h2_peak_activations)):
                timeline = run(name, p, m, 1.0, 1.0, 1.0)
                assert [timeline.peak_activations(r) for r in range(p)] == [formula(p, m)] * p
            if m >= 2 * p - 1:
                timeline = run("zb-v", p, m, 1.0, 1.0, 1.0)
                expected = [zb_v_peak_activations(p, m)] * p
                assert [timeline.peak_activations(r) for r in range(p)] == expected
            if m >= 2 * p:
                timeline = run("dualpipev", p, m, 1.0, 1.0, 1.0)
                expected = [dualpipev_peak_activations(p, m)] * p
                assert [timeline.peak_activations(r) for r in range(p)] == expected


def test_zb_v_memory_equals_1f1b_rank0_and_zb_h1_peak() -> None:
    for p in (2, 4, 8):
        one_f_one_b = simulate(build("1f1b", num_ranks=p, num_microbatches=2 * p))
        assert zb_v_peak_activations(p, 2 * p) == one_f_one_b.peak_activations(0)
        assert zb_h1_peak_activations(p, 2 * p) == one_f_one_b.peak_activations(0)


def test_conditions_are_enforced_and_are_real() -> None:
    # W > min(F, I): the formula is refused, and the simulator indeed disagrees with it
    with pytest.raises(ConfigError, match=r"W <= min\(F, I\)"):
        zb_h1_bubble(4, 1.0, 1.0, 2.0)
    timeline = run("zb-h1", 4, 8, 1.0, 1.0, 2.0)
    assert timeline.makespan != pytest.approx(8 * 4.0 + 3 * (1.0 + 1.0 - 2.0))
    with pytest.raises(ConfigError, match=r"m >= 4"):
        zb_h1_makespan(4, 3, 1.0, 1.0, 1.0)
    with pytest.raises(ConfigError, match=r"2W <= F \+ I"):
        zb_h2_rank_bubble(4, 1.0, 0.5, 1.0)
    with pytest.raises(ConfigError, match="F = I"):
        zb_v_makespan(4, 8, 1.0, 2.0, 1.0)
    with pytest.raises(ConfigError, match=r"m >= 8"):
        dualpipev_peak_activations(4, 7)
