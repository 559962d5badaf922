"""Check that a schedule can run: every action in place, every micro-batch complete, no deadlock.

Dependencies (DESIGN.md): ``F(s, j)`` needs ``F(s-1, j)``; ``B/I(s, j)`` needs ``F(s, j)`` and
``B/I(s+1, j)``; ``W(s, j)`` needs ``I(s, j)``. Each rank runs its row in order and blocks on a
receive until the action it waits for has run, so a schedule deadlocks exactly when following
the rows in order gets stuck. :func:`execution` follows them and is shared with the
simulator, which computes times along the same order.

Two walks, the same verdict: rank by rank in Python (:func:`_walk`), or, for wide pipelines
(:func:`is_wide`), all ranks at once one round at a time in numpy
(:mod:`stagewise.schedules._rounds`). Either only finds *that* something is wrong; the
detailed checks below then name it, so the messages are the same both ways.
"""

from __future__ import annotations

from itertools import chain, repeat
from operator import itemgetter
from typing import TYPE_CHECKING

from stagewise.errors import ScheduleError
from stagewise.schedules._gc import paused_gc
from stagewise.schedules.ir import Action, Op, Schedule

if TYPE_CHECKING:
    from stagewise.schedules._rounds import Levels

__all__ = ["WIDE_ACTIONS", "WIDE_RANKS", "Runs", "check", "execution", "execution_order",
           "is_valid", "is_wide"]

Runs = tuple[tuple[int, int, int], ...]  # (rank, first, stop): rank runs row[first:stop]
# Schedules with at least this many ranks and actions are walked round by round (numpy).
WIDE_RANKS, WIDE_ACTIONS = 16, 4096  # measured: about where the two cost the same

# Completion kinds: the forward, the input gradient (B or I) and the weight gradient (B or W).
_FWD, _GRAD, _WGT = 0, 1, 2
_STAGE, _MICROBATCH = itemgetter(0), itemgetter(2)  # an Action's stage and micro-batch


def check(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` unless ``schedule`` can run to completion.

    Checks that each action sits on the rank holding its stage and in range; that every
    (stage, micro-batch) has exactly one F and one backward (B, or I and W); and that running the
    rows in order with blocking receives never deadlocks. Errors name the rank, the position,
    the action and what it waits for, followed by the schedule table.
    """
    if schedule._derived.get("checked"):
        return
    execution(schedule)  # checks placement, completeness and deadlock in one walk
    schedule._derived["checked"] = True


def is_valid(schedule: Schedule) -> bool:
    """True when :func:`check` passes."""
    try:
        check(schedule)
    except ScheduleError:
        return False
    return True


def _fail(schedule: Schedule, message: str) -> ScheduleError:
    return ScheduleError(f"schedule {schedule.name!r}: {message}\n{schedule.table()}")


def _misplaced(schedule: Schedule, rank: int, position: int, action: Action) -> ScheduleError:
    where = f"rank {rank}, position {position}: action {action}"
    if not 0 <= action.stage < schedule.num_stages:
        return _fail(
            schedule,
            f"{where} names stage {action.stage}, outside 0..{schedule.num_stages - 1}",
        )
    if not 0 <= action.microbatch < schedule.num_microbatches:
        return _fail(
            schedule,
            f"{where} names micro-batch {action.microbatch}, outside "
            f"0..{schedule.num_microbatches - 1}",
        )
    owner = schedule.rank_of(action.stage)
    return _fail(
        schedule,
        f"{where} belongs to stage {action.stage}, which rank {owner} holds: move it to rank "
        f"{owner}'s row",
    )


def _check_complete(schedule: Schedule) -> None:
    """Every action in range and on its stage's rank; each (stage, micro-batch) complete."""
    num_stages, m, placement = schedule.num_stages, schedule.num_microbatches, schedule.placement
    seen: list[list[Op] | None] = [None] * (num_stages * m)
    for rank, row in enumerate(schedule.actions):
        for position, action in enumerate(row):
            stage, j = action.stage, action.microbatch
            if not (0 <= stage < num_stages and 0 <= j < m and placement[stage] == rank):
                raise _misplaced(schedule, rank, position, action)
            ops = seen[stage * m + j]
            if ops is None:
                seen[stage * m + j] = [action.op]
            elif action.op in ops:
                raise _fail(
                    schedule,
                    f"rank {rank}, position {position}: action {action} appears more than "
                    "once: each must appear exactly once",
                )
            else:
                ops.append(action.op)
    for index, ops in enumerate(seen):
        if ops is not None and len(ops) == 2 and Op.F in ops and Op.B in ops:
            continue
        stage, j = divmod(index, m)
        _explain_incomplete(schedule, stage, j, schedule.rank_of(stage), set(ops or ()))


def _explain_incomplete(schedule: Schedule, stage: int, j: int, rank: int, has: set[Op]) -> None:
    if Op.F not in has:
        raise _fail(
            schedule,
            f"stage {stage} micro-batch {j} has no forward: add {stage}F{j} to rank {rank}'s row",
        )
    split = Op.I in has or Op.W in has
    if Op.B in has and split:
        raise _fail(
            schedule,
            f"stage {stage} micro-batch {j} has both a full backward {stage}B{j} and a split "
            f"one ({stage}I{j}/{stage}W{j}): keep one of the two",
        )
    if not split and Op.B not in has:
        raise _fail(
            schedule,
            f"stage {stage} micro-batch {j} has no backward: add {stage}B{j} (or {stage}I{j} "
            f"and {stage}W{j}) to rank {rank}'s row",
        )
    if split and not (Op.I in has and Op.W in has):
        lacking = f"{stage}I{j}" if Op.I not in has else f"{stage}W{j}"
        raise _fail(
            schedule,
            f"stage {stage} micro-batch {j} splits its backward but lacks {lacking}: add it to "
            f"rank {rank}'s row",
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


def execution_order(schedule: Schedule) -> list[tuple[int, Action]]:
    """One order in which the ranks can run their rows, as (rank, action) pairs.

    Every action appears after everything it depends on and after the actions before it on its
    own rank, so the list is a valid sequential execution of the whole pipeline: the order of
    :func:`execution`, written out. Computed once per schedule and reused.

    Raises:
        ScheduleError: as :func:`execution`.
    """
    cached = schedule._derived.get("execution_order")
    if cached is not None:
        return cached  # type: ignore[return-value]
    rows, found = schedule.actions, execution(schedule)
    with paused_gc():
        if isinstance(found, tuple):
            order = list(chain.from_iterable(
                zip(repeat(rank, stop - first), rows[rank][first:stop], strict=True)
                for rank, first, stop in found
            ))
        else:
            flat = list(chain.from_iterable(rows))
            ranks = found.columns.rank[found.order].tolist()
            order = list(zip(ranks, map(flat.__getitem__, found.order.tolist()), strict=True))
    schedule._derived["execution_order"] = order
    return order


def execution(schedule: Schedule) -> Runs | Levels:
    """How the rows run, found once per schedule and reused.

    For most schedules, the runs of the sequential walk: ``(rank, first, stop)``, ``rank``
    runs ``actions[rank][first:stop]`` next, then the next run follows (each as long as the
    rank can go before it waits for another rank; a rank's runs come in row order). For wide
    ones (:func:`is_wide`), the :class:`~stagewise.schedules._rounds.Levels` of the walk that
    moves all ranks at once, one round at a time; the verdict and the errors are the same.
    The simulator times the actions in either order.

    Raises:
        ScheduleError: an action out of range or on the wrong rank, a (stage, micro-batch)
            incomplete or with an action twice, or rows that deadlock (each stuck rank, its
            position, its action and the action it waits for).
    """
    cached = schedule._derived.get("execution")
    if cached is not None:
        return cached  # type: ignore[return-value]
    with paused_gc():
        found, position = _run_rows(schedule)
    if found is None:
        # Something is wrong: name it the way the separate checks do, a misplaced or
        # incomplete action first, then the deadlock.
        _check_complete(schedule)
        assert position is not None, "an action out of place passed _check_complete"
        raise _deadlock(schedule, position)
    schedule._derived["execution"] = found
    return found


def is_wide(schedule: Schedule) -> bool:
    """True when the round-by-round walk is the faster: many ranks (a round's numpy calls
    then stand in for many Python steps) and enough actions to repay setting it up."""
    return schedule.num_ranks >= WIDE_RANKS and schedule.num_actions >= WIDE_ACTIONS


def _run_rows(schedule: Schedule) -> tuple[Runs | Levels | None, list[int] | None]:
    if is_wide(schedule):
        from stagewise.schedules._rounds import walk_rounds  # numpy, only when needed

        return walk_rounds(schedule)
    if not _in_place(schedule):
        return None, None
    return _walk(schedule)


def _in_place(schedule: Schedule) -> bool:
    """Every action names a stage its rank holds and a micro-batch in 0..m-1 (sets, in C)."""
    microbatches = set(range(schedule.num_microbatches))
    for rank, row in enumerate(schedule.actions):
        if not (set(map(_STAGE, row)) <= set(schedule.stages_of(rank))
                and set(map(_MICROBATCH, row)) <= microbatches):
            return False
    return True


def _walk(schedule: Schedule) -> tuple[Runs | None, list[int]]:
    """Run the rows in order with blocking receives, every action already in place: (the
    runs, or None if not all ran; where each rank stopped). None too when a (stage,
    micro-batch) is left incomplete or has an action twice (or a B beside its I or W).

    One flag per completion in ``ran``: the forward of (s, j) at (s + 1) * m + j, after a
    block of ones for stage 0's absent input; its input gradient (B or I) at ``grads`` +
    s * m + j, before a block of ones for the last stage's absent gradient; its weight
    gradient (B or W) at ``weights`` + s * m + j. Every action sets one flag (a B two), so
    the rows ran completely, each action once, exactly when every flag is set and there were
    as many settings as flags. A rank blocked on a flag waits in ``waiter`` at it: one rank at
    most, since only the rank holding the neighbouring stage waits there for another rank; a
    rank waiting on its own flag never runs again, so nothing is lost when it is overwritten.
    """
    m, rows, num_stages = schedule.num_microbatches, schedule.actions, schedule.num_stages
    grads, weights = (num_stages + 1) * m, 2 * (num_stages + 1) * m
    ran = bytearray(b"\1" * m + b"\0" * (num_stages * 2 * m) + b"\1" * m
                    + b"\0" * (num_stages * m))
    waiter = [-1] * len(ran)
    position = [0] * schedule.num_ranks
    ready = list(range(schedule.num_ranks - 1, -1, -1))  # a stack: rank 0 first
    runs: list[tuple[int, int, int]] = []
    count = backwards = 0
    op_f, op_b, op_w = Op.F, Op.B, Op.W
    while ready:
        rank = ready.pop()
        row = rows[rank]
        first = k = position[rank]
        stop = len(row)
        while k < stop:
            stage, op, j = row[k]
            here = stage * m + j
            if op is op_f:
                need, key = here, here + m
            elif op is op_w:
                need, key = grads + here, weights + here
            else:  # B or I: its own forward, then the next stage's gradient
                need = grads + here + m if ran[here + m] else here + m
                key = grads + here
            if not ran[need]:
                waiter[need] = rank
                break
            if op is op_b:
                ran[weights + here] = 1
                backwards += 1
            ran[key] = 1
            if waiter[key] >= 0:
                ready.append(waiter[key])
                waiter[key] = -1
            k += 1
        if k > first:
            runs.append((rank, first, k))
            count += k - first
            position[rank] = k
    flags = 3 * num_stages * m
    if count + backwards != flags or count != schedule.num_actions or 0 in ran:
        return None, position
    return tuple(runs), position


def _deadlock(schedule: Schedule, position: list[int]) -> ScheduleError:
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
