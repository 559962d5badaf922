"""The validator: placement, completeness, and deadlock under blocking receives."""

from __future__ import annotations

import pytest

from stagewise.errors import ScheduleError
from stagewise.schedules import Op, Schedule, build, check, execution_order, is_valid


def test_valid_hand_written_split_backward() -> None:
    # Rank 1 splits its backward into I and W and defers the W to the end.
    schedule = Schedule.from_csv("0F0,0F1,0B0,0B1\n1F0,1I0,1F1,1I1,1W0,1W1\n")
    check(schedule)
    assert schedule.splits_backward


def test_missing_backward_is_named_with_the_fix() -> None:
    schedule = Schedule.from_csv("0F0,0F1,0B0\n1F0,1B0,1F1,1B1\n")
    with pytest.raises(ScheduleError, match=r"stage 0 micro-batch 1 has no backward: add 0B1"):
        check(schedule)


def test_duplicate_and_half_split_backward() -> None:
    with pytest.raises(ScheduleError, match="appears more than once"):
        check(Schedule.from_csv("0F0,0F0,0B0\n1F0,1B0\n"))
    with pytest.raises(ScheduleError, match="lacks 1W0"):
        check(Schedule.from_csv("0F0,0B0\n1F0,1I0\n"))
    with pytest.raises(ScheduleError, match="both a full backward"):
        check(Schedule.from_csv("0F0,0B0\n1F0,1B0,1I0,1W0\n"))


def test_action_on_wrong_rank() -> None:
    schedule = Schedule(
        name="bad", num_ranks=2, num_stages=2, num_microbatches=1, placement=(0, 1),
        actions=((Schedule.from_csv("0F0,1F0\n").actions[0][0],),
                 tuple(Schedule.from_csv("1F0,1B0,0B0\n").actions[0])),
    )
    with pytest.raises(ScheduleError, match="rank 1, position 2: action 0B0 belongs to stage 0"):
        check(schedule)


def test_deadlock_names_ranks_positions_and_what_they_wait_for() -> None:
    # Rank 0 runs 0B0 before 0F1... fine; but rank 1 wants 1F1 before 1B0 while rank 0 waits
    # for 1B0 before sending 0F1: a cycle.
    schedule = Schedule.from_csv("0F0,0B0,0F1,0B1\n1F0,1F1,1B0,1B1\n")
    with pytest.raises(ScheduleError) as err:
        check(schedule)
    text = str(err.value)
    assert "deadlock" in text
    assert "rank 0 at position 1 (0B0) waits for 1B/I0 (rank 1, position 2)" in text
    assert "rank 1 at position 1 (1F1) waits for 0F1 (rank 0, position 2)" in text
    assert "rank  0: 0F0 0B0 0F1 0B1" in text  # the table follows
    assert not is_valid(schedule)


def test_backward_before_forward_on_same_rank_deadlocks() -> None:
    schedule = Schedule.from_csv("0B0,0F0\n1F0,1B0\n")
    with pytest.raises(ScheduleError, match="deadlock"):
        check(schedule)


def test_execution_order_respects_rows_and_dependencies() -> None:
    schedule = build("interleaved-1f1b", num_ranks=3, num_microbatches=5, num_chunks=2)
    order = execution_order(schedule)
    assert len(order) == schedule.num_actions
    index = {action: k for k, (_, action) in enumerate(order)}
    for rank, row in enumerate(schedule.actions):
        positions = [index[a] for a in row]
        assert positions == sorted(positions), f"rank {rank} out of row order"
    for action, k in index.items():
        s, j = action.stage, action.microbatch
        if action.op is Op.F and s > 0:
            assert index[type(action)(s - 1, Op.F, j)] < k
        if action.op is Op.B:
            assert index[type(action)(s, Op.F, j)] < k
            if s + 1 < schedule.num_stages:
                assert index[type(action)(s + 1, Op.B, j)] < k
