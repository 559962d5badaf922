"""Looped BFS, ZB-H1, ZB-H2, ZB-V and DualPipeV: exact tables for tiny sizes, rules on a grid.

The literal tables were derived by hand from each module's phase description (docstrings), not
printed from the code; the grid tests check the rules every schedule must keep; ZB-V, DualPipeV
and looped BFS are compared, row for row, with torch.distributed.pipelining's own orders.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stagewise.errors import ScheduleError
from stagewise.schedules import Op, Schedule, build, check, names
from stagewise.schedules.dualpipe import dualpipe_v
from stagewise.schedules.looped_bfs import looped_bfs
from stagewise.schedules.zbv import zb_v
from stagewise.schedules.zero_bubble import zb_h1, zb_h2
from stagewise.sim import Costs, simulate

NEW = ("looped-bfs", "zb-h1", "zb-h2", "zb-v", "dualpipev")


def rows(schedule: Schedule) -> list[str]:
    return [" ".join(str(a) for a in row) for row in schedule.actions]


# --- exact tables --------------------------------------------------------------------------


def test_looped_bfs_table_p2_m2_v2() -> None:
    # chunk 0 forwards, chunk 1 forwards, then chunk 1 and chunk 0 backwards, last mb first
    assert rows(looped_bfs(2, 2, 2)) == [
        "0F0 0F1 2F0 2F1 2B1 2B0 0B1 0B0",
        "1F0 1F1 3F0 3F1 3B1 3B0 1B1 1B0",
    ]


def test_zb_h1_table_p2_m3() -> None:
    # rank 0: 1 warm-up F, W not deferred; rank 1: no warm-up, W deferred by one step
    assert rows(zb_h1(2, 3)) == [
        "0F0 0F1 0I0 0W0 0F2 0I1 0W1 0I2 0W2",
        "1F0 1I0 1F1 1I1 1W0 1F2 1I2 1W1 1W2",
    ]


def test_zb_h1_table_p3_m3() -> None:
    assert rows(zb_h1(3, 3)) == [
        "0F0 0F1 0F2 0I0 0W0 0I1 0W1 0I2 0W2",
        "1F0 1F1 1I0 1F2 1I1 1W0 1I2 1W1 1W2",
        "2F0 2I0 2F1 2I1 2F2 2I2 2W0 2W1 2W2",
    ]


def test_zb_h2_table_p2_m4() -> None:
    # rank 0: 3 warm-up F, steps I W F; rank 1: 1 warm-up F, W deferred by two steps
    assert rows(zb_h2(2, 4)) == [
        "0F0 0F1 0F2 0I0 0W0 0F3 0I1 0W1 0I2 0W2 0I3 0W3",
        "1F0 1I0 1F1 1I1 1F2 1I2 1W0 1F3 1I3 1W1 1W2 1W3",
    ]


def test_zb_v_table_p2_m3() -> None:
    # rank 0 holds stages 0 and 3, rank 1 stages 1 and 2
    assert rows(zb_v(2, 3)) == [
        "0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0I0 0W0 3F2 3I2 3W2 0I1 0W1 0I2 0W2",
        "1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1I1 2I2 1I2 1W1 2W2 1W2",
    ]
    assert zb_v(2, 3).placement == (0, 1, 1, 0)


def test_dualpipev_table_p1_m2() -> None:
    # phase 2: F0 F1; phase 4: unoverlapped F/B on the last rank, then F1&B0; phase 6: B, I;
    # phase 8: the deferred W
    assert rows(dualpipe_v(1, 2)) == ["0F0 1F0 0F1 1B0 1F1 0B0 1B1 0I1 0W1"]


def test_dualpipev_table_p2_m4() -> None:
    assert rows(dualpipe_v(2, 4)) == [
        "0F0 0F1 0F2 3F0 3I0 3W0 3F1 0F3 3B1 3F2 0B0 3B2 3F3 0B1 3B3 0I2 0W2 0I3 0W3",
        "1F0 2F0 1F1 2F1 1F2 2B0 2F2 1B0 1F3 2B1 2F3 1B1 2B2 1B2 2I3 1I3 2W3 1W3",
    ]


# --- errors --------------------------------------------------------------------------------


def test_dualpipev_refuses_small_m_naming_the_m_that_works() -> None:
    with pytest.raises(ScheduleError, match=r"m >= 8"):
        dualpipe_v(4, 7)
    with pytest.raises(ScheduleError, match=r"m=7"):
        build("dualpipev", num_ranks=4, num_microbatches=7)


@pytest.mark.parametrize("name", NEW)
def test_non_positive_sizes_are_refused(name: str) -> None:
    with pytest.raises(ScheduleError):
        build(name, num_ranks=0, num_microbatches=4)


def test_v_schedules_refuse_other_chunk_counts() -> None:
    for name in ("zb-v", "dualpipev"):
        with pytest.raises(ScheduleError, match="exactly 2 chunk"):
            build(name, num_ranks=2, num_microbatches=4, num_chunks=3)


def test_all_new_names_registered() -> None:
    assert set(NEW) <= set(names())


# --- rules over a grid ---------------------------------------------------------------------


def assert_complete(schedule: Schedule, split: bool | None) -> None:
    """Every (stage, mb) has one F and either one B or one I and one W, on its own rank."""
    counts = Counter((a.stage, a.op, a.microbatch) for row in schedule.actions for a in row)
    assert all(c == 1 for c in counts.values())
    for rank, row in enumerate(schedule.actions):
        assert all(schedule.placement[a.stage] == rank for a in row)
    for stage in range(schedule.num_stages):
        for j in range(schedule.num_microbatches):
            assert counts[(stage, Op.F, j)] == 1
            has_b = counts[(stage, Op.B, j)]
            has_iw = counts[(stage, Op.I, j)] + counts[(stage, Op.W, j)]
            assert (has_b, has_iw) in ((1, 0), (0, 2))
            if split is not None:
                assert bool(has_iw) == split
    if split is not None:
        per_pair = 3 if split else 2
        assert schedule.num_actions == per_pair * schedule.num_stages * schedule.num_microbatches


sizes = st.tuples(st.integers(1, 8), st.integers(1, 24))


@settings(max_examples=60, deadline=None)
@given(sizes, st.integers(1, 3))
def test_looped_bfs_rules(size: tuple[int, int], v: int) -> None:
    p, m = size
    schedule = looped_bfs(p, m, v)
    check(schedule)
    assert schedule.placement == tuple(s % p for s in range(p * v))
    assert_complete(schedule, split=False)


@settings(max_examples=60, deadline=None)
@given(sizes, st.sampled_from(["zb-h1", "zb-h2"]))
def test_zb_h_rules(size: tuple[int, int], name: str) -> None:
    p, m = size
    schedule = build(name, num_ranks=p, num_microbatches=m)
    assert schedule.placement == tuple(range(p))
    assert_complete(schedule, split=True)


@settings(max_examples=60, deadline=None)
@given(sizes)
def test_zb_v_rules(size: tuple[int, int]) -> None:
    p, m = size
    schedule = build("zb-v", num_ranks=p, num_microbatches=m)
    for rank in range(p):
        assert schedule.stages_of(rank) == (rank, 2 * p - 1 - rank)
    assert_complete(schedule, split=True)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(0, 16))
def test_dualpipev_rules(p: int, extra: int) -> None:
    schedule = build("dualpipev", num_ranks=p, num_microbatches=2 * p + extra)
    for rank in range(p):
        assert schedule.stages_of(rank) == (rank, 2 * p - 1 - rank)
    assert_complete(schedule, split=None)


def test_every_new_schedule_valid_on_a_full_small_grid() -> None:
    for name in NEW:
        for p in range(1, 7):
            for m in range(2 * p if name == "dualpipev" else 1, 3 * p + 3):
                build(name, num_ranks=p, num_microbatches=m)  # build() runs check()


def test_csv_round_trip_keeps_the_new_schedules() -> None:
    for name in NEW:
        schedule = build(name, num_ranks=3, num_microbatches=7)
        again = Schedule.from_csv(schedule.to_csv(), name=name)
        assert again.actions == schedule.actions
        assert again.placement == schedule.placement


# --- what the split buys: the zero-bubble orders beat 1F1B in the simulator ----------------


@pytest.mark.parametrize(("p", "m"), [(4, 8), (8, 16)])
def test_zero_bubble_beats_1f1b_with_equal_f_i_w(p: int, m: int) -> None:
    def makespan(name: str) -> float:
        schedule = build(name, num_ranks=p, num_microbatches=m)
        return simulate(schedule, Costs.uniform(schedule, 1.0, 2.0, 1.0)).makespan

    one_f_one_b = makespan("1f1b")
    assert one_f_one_b == 3 * (m + p - 1)
    for name in ("zb-h1", "zb-h2", "zb-v", "dualpipev"):
        assert makespan(name) < one_f_one_b


# --- the same orders as torch.distributed.pipelining ----------------------------------------


def torch_rows(schedule_class: type, num_ranks: int, num_microbatches: int,
               num_local_stages: int) -> list[list[str]]:
    """Rows from torch's own order generator, without building stages or a process group.

    Reaches into torch's private ``_calculate_single_rank_operations`` (skipped if it moves);
    an overlapped F&B action is expanded into its forward then its backward, as ours are.
    """
    if not hasattr(schedule_class, "_calculate_single_rank_operations"):
        pytest.skip("torch's schedule generator moved")
    obj: Any = object.__new__(schedule_class)
    obj.pp_group_size = num_ranks
    obj._n_microbatches = num_microbatches
    obj.num_stages = obj._num_stages = num_ranks * num_local_stages
    obj._stages = [None] * num_local_stages
    rows = []
    for rank in range(num_ranks):
        row: list[str] = []
        for action in obj._calculate_single_rank_operations(rank):
            if action is None:
                continue
            parts = getattr(action, "sub_actions", None) or (action,)
            row.extend(str(part) for part in parts)
        rows.append(row)
    return rows


@pytest.mark.parametrize(("name", "class_name", "chunks"), [
    ("zb-v", "ScheduleZBVZeroBubble", 2),
    ("dualpipev", "ScheduleDualPipeV", 2),
    ("looped-bfs", "ScheduleLoopedBFS", 2),
    ("looped-bfs", "ScheduleLoopedBFS", 3),
])
def test_orders_match_torch(name: str, class_name: str, chunks: int) -> None:
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    schedule_class = getattr(schedules, class_name, None)
    if schedule_class is None:
        pytest.skip(f"this torch has no {class_name}")
    for p in (1, 2, 3, 4):
        for m in range(2 * p if name == "dualpipev" else 1, 3 * p + 2):
            ours = build(name, num_ranks=p, num_microbatches=m, num_chunks=chunks)
            assert [[str(a) for a in row] for row in ours.actions] == torch_rows(
                schedule_class, p, m, chunks), (name, p, m)
