"""Lowering: messages follow from placement; every send is received once, in sender order."""

from __future__ import annotations

import pytest

from stagewise.errors import ScheduleError
from stagewise.runtime.engine.lowering import Kind, Message, lower
from stagewise.schedules import Schedule, build, names

V_CSV = """0F0,3F0,3B0,0B0
1F0,2F0,2B0,1B0
"""


def test_two_rank_gpipe_messages_by_hand() -> None:
    schedule = build("gpipe", num_ranks=2, num_microbatches=2)
    rank0, rank1 = lower(schedule, 0), lower(schedule, 1)
    act = [Message(Kind.ACTIVATION, 0, j, 0, 1) for j in (0, 1)]
    assert [m for m in rank0.sends if m] == act
    assert rank1.receives == {0: tuple(act)}
    grads = [m for m in rank1.sends if m]
    assert {(m.kind, m.stage, m.src, m.dst) for m in grads} == {(Kind.GRADIENT, 1, 1, 0)}
    assert rank0.receives == {1: tuple(grads)}


def test_same_rank_neighbours_exchange_nothing() -> None:
    schedule = Schedule.from_csv(V_CSV, "v")
    plan = lower(schedule, 1)
    # Rank 1 holds stages 1 and 2: 1F0 -> 2F0 and 2B0 -> 1B0 stay local.
    assert plan.sends == (
        None, Message(Kind.ACTIVATION, 2, 0, 1, 0), None, Message(Kind.GRADIENT, 1, 0, 1, 0)
    )
    assert plan.receives == {0: (Message(Kind.ACTIVATION, 0, 0, 0, 1),
                                 Message(Kind.GRADIENT, 3, 0, 0, 1))}


@pytest.mark.parametrize("name", names())
@pytest.mark.parametrize("num_ranks", [2, 3, 4])
def test_every_send_is_received_exactly_once_in_order(name: str, num_ranks: int) -> None:
    try:
        schedule = build(name, num_ranks=num_ranks, num_microbatches=2 * num_ranks)
    except ScheduleError:
        pytest.skip(f"{name} does not build with p={num_ranks}")
    plans = [lower(schedule, r) for r in range(num_ranks)]
    for src in range(num_ranks):
        sent = [m for m in plans[src].sends if m is not None]
        for dst in range(num_ranks):
            expected = tuple(m for m in sent if m.dst == dst)
            assert plans[dst].receives.get(src, ()) == expected
    # Each cross-rank stage boundary carries one activation and one gradient per micro-batch.
    crossings = sum(
        schedule.rank_of(s) != schedule.rank_of(s + 1) for s in range(schedule.num_stages - 1)
    )
    total = sum(1 for plan in plans for m in plan.sends if m is not None)
    assert total == 2 * crossings * schedule.num_microbatches
    tags = {m.tag(schedule.num_stages, schedule.num_microbatches)
            for plan in plans for m in plan.sends if m is not None}
    assert len(tags) == total
    assert all(t % 4 == 0 for t in tags)
    assert max(tags) + 2 < 8 * schedule.num_stages * schedule.num_microbatches
