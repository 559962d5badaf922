"""Check that a schedule can run: every action in place, every micro-batch complete, no deadlock.

Dependencies (DESIGN.md): ``F(s, j)`` needs ``F(s-1, j)``; ``B/I(s, j)`` needs ``F(s, j)`` and
``B/I(s+1, j)``; ``W(s, j)`` needs ``I(s, j)``. Each rank runs its row in order and blocks on a
receive until the action it waits for has run, so a schedule deadlocks exactly when following
the rows in order gets stuck. :func:`execution_order` follows them and is shared with the
simulator, which computes times along the same order.
"""

from __future__ import annotations

from collections import Counter, deque

from stagewise.errors import ScheduleError
from stagewise.schedules.ir import Action, Op, Schedule

__all__ = ["check", "execution_order", "is_valid"]

# Completion kinds: the forward, the input gradient (B or I) and the weight gradient (B or W).
_FWD, _GRAD, _WGT = 0, 1, 2


def check(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` unless ``schedule`` can run to completion.

    Checks that each action sits on the rank holding its stage and in range; that every
    (stage, micro-batch) has exactly one F and one backward (B, or I and W); and that running the
    rows in order with blocking receives never deadlocks. Errors name the rank, the position,
    the action and what it waits for, followed by the schedule table.
    """
    _check_placement(schedule)
    _check_complete(schedule)
    execution_order(schedule)


def is_valid(schedule: Schedule) -> bool:
    """True when :func:`check` passes."""
    try:
        check(schedule)
    except ScheduleError:
        return False
    return True


def _fail(schedule: Schedule, message: str) -> ScheduleError:
    return ScheduleError(f"schedule {schedule.name!r}: {message}\n{schedule.table()}")


def _check_placement(schedule: Schedule) -> None:
    for rank, row in enumerate(schedule.actions):
        for position, action in enumerate(row):
            if not 0 <= action.stage < schedule.num_stages:
                raise _fail(
                    schedule,
                    f"rank {rank}, position {position}: action {action} names stage "
                    f"{action.stage}, outside 0..{schedule.num_stages - 1}",
                )
            if not 0 <= action.microbatch < schedule.num_microbatches:
                raise _fail(
                    schedule,
                    f"rank {rank}, position {position}: action {action} names micro-batch "
                    f"{action.microbatch}, outside 0..{schedule.num_microbatches - 1}",
                )
            owner = schedule.rank_of(action.stage)
            if owner != rank:
                raise _fail(
                    schedule,
                    f"rank {rank}, position {position}: action {action} belongs to stage "
                    f"{action.stage}, which rank {owner} holds: move it to rank {owner}'s row",
                )


def _check_complete(schedule: Schedule) -> None:
    counts = Counter(
        (action.stage, action.microbatch, action.op)
        for row in schedule.actions
        for action in row
    )
    for (stage, microbatch, op), count in counts.items():
        if count > 1:
            raise _fail(
                schedule,
                f"action {stage}{op.value}{microbatch} appears {count} times on rank "
                f"{schedule.rank_of(stage)}: each must appear exactly once",
            )
    for stage in range(schedule.num_stages):
        rank = schedule.rank_of(stage)
        for j in range(schedule.num_microbatches):
            has = {op: counts[(stage, j, op)] for op in Op}
            if not has[Op.F]:
                raise _fail(
                    schedule,
                    f"stage {stage} micro-batch {j} has no forward: add {stage}F{j} to rank "
                    f"{rank}'s row",
                )
            split = has[Op.I] or has[Op.W]
            if has[Op.B] and split:
                raise _fail(
                    schedule,
                    f"stage {stage} micro-batch {j} has both a full backward {stage}B{j} and a "
                    f"split one ({stage}I{j}/{stage}W{j}): keep one of the two",
                )
            if not has[Op.B] and not split:
                raise _fail(
                    schedule,
                    f"stage {stage} micro-batch {j} has no backward: add {stage}B{j} (or "
                    f"{stage}I{j} and {stage}W{j}) to rank {rank}'s row",
                )
            if split and not (has[Op.I] and has[Op.W]):
                lacking = f"{stage}I{j}" if not has[Op.I] else f"{stage}W{j}"
                raise _fail(
                    schedule,
                    f"stage {stage} micro-batch {j} splits its backward but lacks {lacking}: "
                    f"add it to rank {rank}'s row",
                )


def _needs(action: Action, num_stages: int) -> tuple[tuple[int, int], ...]:
    """The (kind, stage) completions ``action`` waits for, for its own micro-batch."""
    stage = action.stage
    if action.op is Op.F:
        return ((_FWD, stage - 1),) if stage > 0 else ()
    if action.op is Op.W:
        return ((_GRAD, stage),)
    if stage + 1 < num_stages:
        return ((_FWD, stage), (_GRAD, stage + 1))
    return ((_FWD, stage),)


def _gives(op: Op) -> tuple[int, ...]:
    if op is Op.F:
        return (_FWD,)
    if op is Op.B:
        return (_GRAD, _WGT)
    if op is Op.I:
        return (_GRAD,)
    return (_WGT,)


def execution_order(schedule: Schedule) -> list[tuple[int, Action]]:
    """One order in which the ranks can run their rows, as (rank, action) pairs.

    Every action appears after everything it depends on and after the actions before it on its
    own rank, so the list is a valid sequential execution of the whole pipeline.

    Raises:
        ScheduleError: the rows deadlock; names each stuck rank, its position, its action and
            the action it waits for.
    """
    num_stages, m = schedule.num_stages, schedule.num_microbatches
    done: set[tuple[int, int, int]] = set()
    waiting: dict[tuple[int, int, int], list[int]] = {}
    position = [0] * schedule.num_ranks
    ready = deque(range(schedule.num_ranks))
    order: list[tuple[int, Action]] = []
    while ready:
        rank = ready.popleft()
        row = schedule.actions[rank]
        while position[rank] < len(row):
            action = row[position[rank]]
            j = action.microbatch
            missing = next(
                ((kind, s, j) for kind, s in _needs(action, num_stages) if (kind, s, j) not in done),
                None,
            )
            if missing is not None:
                waiting.setdefault(missing, []).append(rank)
                break
            for kind in _gives(action.op):
                key = (kind, action.stage, j)
                done.add(key)
                ready.extend(waiting.pop(key, ()))
            order.append((rank, action))
            position[rank] += 1
    if len(order) != schedule.num_actions:
        raise _deadlock(schedule, position, m)
    return order


def _deadlock(schedule: Schedule, position: list[int], m: int) -> ScheduleError:
    where = {a: (r, k) for r, row in enumerate(schedule.actions) for k, a in enumerate(row)}
    names = {_FWD: "F", _GRAD: "B/I", _WGT: "W"}
    lines = []
    for rank, row in enumerate(schedule.actions):
        if position[rank] >= len(row):
            continue
        action = row[position[rank]]
        waits = []
        for kind, stage in _needs(action, schedule.num_stages):
            ops = {_FWD: (Op.F,), _GRAD: (Op.B, Op.I), _WGT: (Op.B, Op.W)}[kind]
            found = [where[Action(stage, op, action.microbatch)] for op in ops
                     if Action(stage, op, action.microbatch) in where]
            label = f"{stage}{names[kind]}{action.microbatch}"
            if not found:
                waits.append(f"{label}, which no rank runs")
            elif found[0][1] >= position[found[0][0]]:
                waits.append(f"{label} (rank {found[0][0]}, position {found[0][1]})")
        lines.append(
            f"rank {rank} at position {position[rank]} ({action}) waits for " + ", ".join(waits)
        )
    return _fail(schedule, "deadlock: " + "; ".join(lines))
