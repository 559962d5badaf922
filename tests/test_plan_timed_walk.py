"""The planner's timed walk refuses what the validator refuses, so its replay's premise holds."""

from __future__ import annotations

from dataclasses import replace

import pytest

from stagewise.errors import ScheduleError
from stagewise.plan.timed_walk import idle_and_slack, idle_and_slack_in_order
from stagewise.schedules import Action, Op, build, check


def test_an_action_off_its_stages_rank_is_refused_not_timed() -> None:
    schedule = build("1f1b", num_ranks=2, num_microbatches=2)
    moved = Action(1, Op.B, 1)
    row0, row1 = schedule.actions
    at = row0.index(Action(0, Op.B, 1))
    bad = replace(schedule, actions=((*row0[:at], moved, *row0[at:]),
                                     tuple(a for a in row1 if a != moved)))
    with pytest.raises(ScheduleError):
        check(bad)  # the validator's verdict, the reference
    costs = (1.0, 1.0), (2.0, 2.0), (0.0, 0.0), (0.0,)
    with pytest.raises(ScheduleError):
        idle_and_slack(bad, *costs)


def test_the_replay_of_a_recorded_order_gives_the_walks_times() -> None:
    schedule = build("interleaved-1f1b", num_ranks=3, num_microbatches=6, num_chunks=2)
    order: list[Action] = []
    forward = tuple(1.0 + 0.1 * s for s in range(6))
    backward = tuple(2.0 + 0.3 * (s % 2) for s in range(6))
    weight, hops = (0.0,) * 6, (0.05,) * 5
    walked = idle_and_slack(schedule, forward, backward, weight, hops, order)
    assert len(order) == sum(len(row) for row in schedule.actions)
    replayed = idle_and_slack_in_order(schedule, order, forward, backward, weight, hops)
    assert replayed.idle == pytest.approx(walked.idle, rel=1e-12)
    assert replayed.stage_slack == pytest.approx(walked.stage_slack, rel=1e-12)
