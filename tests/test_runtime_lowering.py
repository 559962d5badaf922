"""Lowering: messages follow from placement; every send is received once, in sender order."""

from __future__ import annotations

import pytest

from stagewise.errors import ScheduleError
from stagewise.runtime.engine.lowering import Kind, Message, lower
from stagewise.schedules import Schedule, build, names
from stagewise.schedules.ir import Action, Op

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


# --- the global order every rank posts its transfers in (what NCCL needs) ----------------------


def _schedules() -> list[Schedule]:
    schedules = [Schedule.from_csv(V_CSV, "v")]
    for name in names():
        for num_ranks in (2, 3, 4):
            for m in (1, num_ranks, 2 * num_ranks + 1):
                try:
                    schedules.append(build(name, num_ranks=num_ranks, num_microbatches=m))
                except ScheduleError:
                    continue
    return schedules


SCHEDULES = _schedules()


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"{s.name}-p{s.num_ranks}-m"
                         f"{s.num_microbatches}")
def test_order_lists_each_message_once_and_agrees_between_ranks(schedule: Schedule) -> None:
    plans = [lower(schedule, r) for r in range(schedule.num_ranks)]
    for rank, plan in enumerate(plans):
        sent = [m for m in plan.sends if m is not None]
        received = [m for peer in plan.receives.values() for m in peer]
        assert sorted(plan.order, key=repr) == sorted(sent + received, key=repr)
        # A rank's own sends keep its row's order (a send is posted once computed).
        assert [m for m in plan.order if m.src == rank] == sent
    for a in range(schedule.num_ranks):
        for b in range(a + 1, schedule.num_ranks):
            between = {a, b}
            seen_by_a = [m for m in plans[a].order if {m.src, m.dst} == between]
            seen_by_b = [m for m in plans[b].order if {m.src, m.dst} == between]
            assert seen_by_a == seen_by_b


def _needs(action: Action, message: Message) -> bool:
    """Whether ``action`` consumes ``message`` (an activation feeds the next stage's F, a
    gradient the previous stage's B or I)."""
    if action.microbatch != message.microbatch:
        return False
    if message.kind is Kind.ACTIVATION:
        return action.op is Op.F and action.stage == message.stage + 1
    return action.op in (Op.B, Op.I) and action.stage == message.stage - 1


def _run_on_one_stream(schedule: Schedule, posting: list[list[Message]]) -> bool:
    """Play NCCL's rule with one stream per rank: a rank's posted transfers finish one after
    the other, and a transfer finishes when it heads the queues of both its ranks. A rank
    posts its list in order (a send once its action ran) and runs its row; an action waits
    for the messages it consumes. True when every action ran."""
    num_ranks = schedule.num_ranks
    plans = [lower(schedule, r) for r in range(num_ranks)]
    consumed = [
        {index: message for peer in plans[rank].receives.values() for message in peer
         for index, action in enumerate(schedule.actions[rank]) if _needs(action, message)}
        for rank in range(num_ranks)
    ]
    ran = [0] * num_ranks
    posted = [0] * num_ranks
    queues: list[list[Message]] = [[] for _ in range(num_ranks)]
    done: set[Message] = set()
    produced: set[Message] = set()
    progress = True
    while progress:
        progress = False
        for rank in range(num_ranks):
            items = posting[rank]
            while posted[rank] < len(items):
                message = items[posted[rank]]
                if message.src == rank and message not in produced:
                    break
                queues[rank].append(message)
                posted[rank] += 1
                progress = True
            row = schedule.actions[rank]
            while ran[rank] < len(row):
                need = consumed[rank].get(ran[rank])
                if need is not None and need not in done:
                    break
                sent = plans[rank].sends[ran[rank]]
                if sent is not None:
                    produced.add(sent)
                ran[rank] += 1
                progress = True
                break  # let posting catch up after every action
        for rank in range(num_ranks):
            if queues[rank]:
                head = queues[rank][0]
                peer = head.dst if head.src == rank else head.src
                if queues[peer] and queues[peer][0] == head:
                    queues[rank].pop(0)
                    queues[peer].pop(0)
                    done.add(head)
                    progress = True
    return all(ran[r] == len(schedule.actions[r]) for r in range(num_ranks))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"{s.name}-p{s.num_ranks}-m"
                         f"{s.num_microbatches}")
def test_posting_in_the_global_order_never_deadlocks_on_one_stream(schedule: Schedule) -> None:
    posting = [list(lower(schedule, r).order) for r in range(schedule.num_ranks)]
    assert _run_on_one_stream(schedule, posting)


def test_posting_each_transfer_when_needed_deadlocks_1f1b_on_one_stream() -> None:
    # The control: posting sends as computed and receives only when an action needs them
    # (each rank in its own row order) deadlocks 1F1B under NCCL's ordering rule, which is
    # why the runtime posts in the global order.
    schedule = build("1f1b", num_ranks=2, num_microbatches=2)
    posting = []
    for rank in range(2):
        plan = lower(schedule, rank)
        incoming = [m for peer in plan.receives.values() for m in peer]
        items = []
        for index, action in enumerate(schedule.actions[rank]):
            items += [m for m in incoming if _needs(action, m)]
            sent = plan.sends[index]
            if sent is not None:
                items.append(sent)
        posting.append(items)
    assert not _run_on_one_stream(schedule, posting)
