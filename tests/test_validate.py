"""The validator: placement, completeness, and deadlock under blocking receives."""

from __future__ import annotations

import random

import pytest

from stagewise.errors import ScheduleError
from stagewise.schedules import (
    Action,
    Op,
    Schedule,
    build,
    check,
    execution_order,
    is_valid,
    parse_action,
    validate,
)


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


# --- the two walks against a plain reference ----------------------------------------------
#
# The validator walks a schedule one of two ways (rank by rank in Python, or all ranks at once
# round by round for wide pipelines, `is_wide`). Both must accept and refuse exactly what a
# plain walk does, with the same message: the detailed checks' for an action out of place,
# twice or missing, and otherwise the deadlock report from where the ranks stopped.


def reference_verdict(schedule: Schedule) -> str:
    """"ok" or the error message: the detailed checks, then a fixpoint walk over sets."""
    try:
        validate._check_complete(schedule)
    except ScheduleError as error:
        return str(error)
    done: set[tuple[str, int, int]] = set()  # ("F" | "G" (B or I) | "W", stage, micro-batch)
    position = [0] * schedule.num_ranks
    moved = True
    while moved:
        moved = False
        for rank, row in enumerate(schedule.actions):
            while position[rank] < len(row):
                stage, op, j = row[position[rank]]
                if op is Op.F:
                    needs = [("F", stage - 1, j)] if stage > 0 else []
                elif op is Op.W:
                    needs = [("G", stage, j)]
                else:
                    needs = [("F", stage, j)]
                    needs += [("G", stage + 1, j)] if stage + 1 < schedule.num_stages else []
                if not all(need in done for need in needs):
                    break
                done.update({Op.F: [("F", stage, j)], Op.B: [("G", stage, j), ("W", stage, j)],
                             Op.I: [("G", stage, j)], Op.W: [("W", stage, j)]}[op])
                position[rank] += 1
                moved = True
    if all(position[r] == len(row) for r, row in enumerate(schedule.actions)):
        return "ok"
    return str(validate._deadlock(schedule, position))


def verdict(schedule: Schedule) -> str:
    fresh = Schedule(schedule.name, schedule.num_ranks, schedule.num_stages,
                     schedule.num_microbatches, schedule.placement, schedule.actions)
    try:
        check(fresh)
    except ScheduleError as error:
        return str(error)
    return "ok"


@pytest.fixture(params=["rank by rank", "round by round"])
def walk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with each of the validator's walks."""
    if request.param == "round by round":
        monkeypatch.setattr(validate, "WIDE_RANKS", 1)
        monkeypatch.setattr(validate, "WIDE_ACTIONS", 1)
    else:
        monkeypatch.setattr(validate, "WIDE_RANKS", 10**9)
    return str(request.param)


def corrupted(rows: list[list[Action]], rng: random.Random, num_microbatches: int) -> None:
    """One random fault in ``rows``: an action dropped, doubled, swapped, moved to another
    rank, given a micro-batch out of range (or another op)."""
    rank = rng.randrange(len(rows))
    if not rows[rank]:
        return
    k = rng.randrange(len(rows[rank]))
    stage, op, j = rows[rank][k]
    fault = rng.randrange(6)
    if fault == 0:
        del rows[rank][k]
    elif fault == 1:
        rows[rank].insert(rng.randrange(len(rows[rank]) + 1), rows[rank][k])
    elif fault == 2:
        other = rng.randrange(len(rows[rank]))
        rows[rank][k], rows[rank][other] = rows[rank][other], rows[rank][k]
    elif fault == 3:
        rows[rng.randrange(len(rows))].insert(0, rows[rank].pop(k))
    elif fault == 4:
        rows[rank][k] = Action(stage, op, rng.choice([-1, num_microbatches]))
    else:
        rows[rank][k] = Action(stage, rng.choice(list(Op)), j)


BASES = [("gpipe", 3, 4, None), ("1f1b", 4, 6, None), ("interleaved-1f1b", 3, 6, 2),
         ("zb-h1", 3, 5, None), ("zb-v", 3, 6, None), ("dualpipev", 3, 6, None),
         ("looped-bfs", 2, 4, 2), ("interleaved-1f1b", 16, 32, 2)]


@pytest.mark.parametrize(("name", "p", "m", "v"), BASES)
def test_both_walks_refuse_what_the_reference_refuses(walk: str, name: str, p: int, m: int,
                                                      v: int | None) -> None:
    base = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
    rng = random.Random(f"{name}-{p}-{m}")
    outcomes = set()
    for _ in range(150):
        rows = [list(row) for row in base.actions]
        for _ in range(rng.choice([1, 1, 2])):
            corrupted(rows, rng, m)
        schedule = Schedule(base.name, p, base.num_stages, m, base.placement,
                            tuple(tuple(row) for row in rows))
        expected = reference_verdict(schedule)
        assert verdict(schedule) == expected, walk
        outcomes.add(expected.split("\n")[0].split(": ")[1][:12] if expected != "ok" else "ok")
    assert len(outcomes) >= 4  # the faults reached several different checks


@pytest.mark.parametrize(("csv", "message"), [
    ("0F0,0F1,0B0\n1F0,1B0,1F1,1B1\n", "stage 0 micro-batch 1 has no backward"),  # missing B
    ("0F0,0F0,0B0\n1F0,1B0\n", "appears more than once"),  # a forward twice
    ("0F0,0B0,0F1,0B1\n1F0,1F1,1B0,1B1\n", "deadlock"),  # a cycle through both ranks
    ("0B0,0F0\n1F0,1B0\n", "deadlock"),  # a backward before its forward
    ("0F0,0B0,1W0\n1F0,1I0\n", "belongs to stage 1, which rank 1 holds"),  # wrong rank
])
def test_both_walks_name_each_fault(walk: str, csv: str, message: str) -> None:
    schedule = Schedule(
        name="bad", num_ranks=2, num_stages=2, num_microbatches=2 if "1F1" in csv else 1,
        placement=(0, 1),
        actions=tuple(tuple(parse_action(cell) for cell in line.split(","))
                      for line in csv.strip().split("\n")),
    )
    assert message in verdict(schedule)
    assert verdict(schedule) == reference_verdict(schedule)


@pytest.mark.parametrize(("name", "p", "m", "v"), [*BASES, ("zb-h2", 4, 8, None),
                                                  ("interleaved-1f1b", 4, 10, 2)])
def test_both_walks_accept_the_generators_and_give_an_execution_order(
        walk: str, name: str, p: int, m: int, v: int | None) -> None:
    schedule = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
    assert isinstance(validate.execution(schedule), tuple) == (walk == "rank by rank")
    assert reference_verdict(schedule) == "ok"
    order = execution_order(schedule)
    assert sorted(map(str, (a for _, a in order))) == sorted(
        str(a) for row in schedule.actions for a in row)
    assert all(schedule.rank_of(a.stage) == rank for rank, a in order)
    ran: set[tuple[int, Op, int]] = set()
    for _, (stage, op, j) in order:
        if op is Op.F and stage > 0:
            assert (stage - 1, Op.F, j) in ran
        if op is Op.W:
            assert (stage, Op.I, j) in ran
        if op in (Op.B, Op.I):
            assert (stage, Op.F, j) in ran
            assert stage + 1 == schedule.num_stages or {
                (stage + 1, Op.B, j), (stage + 1, Op.I, j)} & ran
        ran.add((stage, op, j))


def test_wide_schedules_are_walked_round_by_round() -> None:
    wide = build("interleaved-1f1b", num_ranks=32, num_microbatches=64, num_chunks=4)
    narrow = build("1f1b", num_ranks=4, num_microbatches=8)
    assert validate.is_wide(wide)
    assert not validate.is_wide(narrow)
    assert not isinstance(validate.execution(wide), tuple)
    assert isinstance(validate.execution(narrow), tuple)
