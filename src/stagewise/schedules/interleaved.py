"""Interleaved 1F1B: Megatron-LM's virtual pipeline stages (Narayanan et al. 2021).

Each of the p ranks holds v chunks; stage s = c * p + r is chunk c of rank r (looped
placement), so the model passes every rank v times. Micro-batches go through in groups of g
(g = p when m is a multiple of p): a rank runs chunk 0's forwards for the group, then chunk 1's,
and so on; backwards go the same way with chunks reversed. Rank r starts with
(v - 1) * g + 2 * (p - r - 1) warm-up forwards, then alternates one forward and one backward.
Each chunk costs 1/v of a full stage, so the bubble shrinks to (p - 1)/(v m) of ideal compute.

When m is not a multiple of p, the micro-batches are split into floor(m / p) groups of sizes
as equal as possible (newer Megatron does the same); sizes whose schedule would deadlock are
refused with the nearest m that works.
"""

from __future__ import annotations

from itertools import chain, repeat

from stagewise.errors import ScheduleError
from stagewise.schedules._checks import require_positive
from stagewise.schedules.ir import Action, Op, Schedule

__all__ = ["interleaved_1f1b"]


def _groups(num_ranks: int, num_microbatches: int) -> list[list[int]]:
    """Split micro-batches 0..m-1 into max(1, m // p) consecutive groups, sizes within one."""
    count = max(1, num_microbatches // num_ranks)
    base, extra = divmod(num_microbatches, count)
    groups, start = [], 0
    for k in range(count):
        size = base + (1 if k < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def _rank_row(rank: int, num_ranks: int, num_chunks: int, groups: list[list[int]]) -> list[Action]:
    # Actions built in C (tuple.__new__(Action, fields) mapped over zips), not one Action(...)
    # call each: large pipelines have hundreds of thousands of them.
    def actions(op: Op, chunks: range) -> list[Action]:
        pairs = [(chunk * num_ranks + rank, group) for group in groups for chunk in chunks]
        stages = chain.from_iterable(repeat(stage, len(group)) for stage, group in pairs)
        microbatches = chain.from_iterable(group for _, group in pairs)
        return list(map(tuple.__new__, repeat(Action), zip(stages, repeat(op), microbatches)))

    forwards = actions(Op.F, range(num_chunks))
    backwards = actions(Op.B, range(num_chunks - 1, -1, -1))
    total = len(forwards)
    warmup = min(total, (num_chunks - 1) * len(groups[0]) + 2 * (num_ranks - rank - 1))
    steady = total - warmup  # one forward, one backward, alternating (slice writes, in C)
    alternating: list[Action] = [forwards[0]] * (2 * steady)
    alternating[0::2] = forwards[warmup:]
    alternating[1::2] = backwards[:steady]
    return forwards[:warmup] + alternating + backwards[steady:]


def _build(num_ranks: int, num_microbatches: int, num_chunks: int) -> Schedule:
    groups = _groups(num_ranks, num_microbatches)
    return Schedule(
        name="interleaved-1f1b",
        num_ranks=num_ranks,
        num_stages=num_ranks * num_chunks,
        num_microbatches=num_microbatches,
        placement=tuple(s % num_ranks for s in range(num_ranks * num_chunks)),
        actions=tuple(
            tuple(_rank_row(r, num_ranks, num_chunks, groups)) for r in range(num_ranks)
        ),
    )


def interleaved_1f1b(num_ranks: int, num_microbatches: int, num_chunks: int = 2) -> Schedule:
    """Build interleaved 1F1B with ``num_chunks`` (v) chunks per rank.

    Raises:
        ScheduleError: a size is not positive, or the grouping for this m would deadlock
            (the message names the nearest m that works).

    Example:
        >>> " ".join(str(a) for a in interleaved_1f1b(2, 2, 2).actions[0])
        '0F0 0F1 2F0 2F1 2B0 2B1 0B0 0B1'
    """
    require_positive(
        "interleaved-1f1b",
        num_ranks=num_ranks,
        num_microbatches=num_microbatches,
        num_chunks=num_chunks,
    )
    from stagewise.schedules.validate import is_valid

    schedule = _build(num_ranks, num_microbatches, num_chunks)
    if not is_valid(schedule):
        works = [
            m
            for m in range(1, 4 * num_ranks + num_microbatches)
            if is_valid(_build(num_ranks, m, num_chunks))
        ]
        nearest = min(works, key=lambda m: (abs(m - num_microbatches), m)) if works else None
        hint = f"use m={nearest} (or any multiple of p={num_ranks})" if nearest else (
            f"use m a multiple of p={num_ranks}"
        )
        raise ScheduleError(
            f"interleaved-1f1b cannot run m={num_microbatches} micro-batches on p={num_ranks} "
            f"ranks with v={num_chunks} chunks without deadlock: {hint}"
        )
    return schedule
