"""Schedule search: list scheduling under a memory limit, never worse than the named schedules.

Notation: p ranks, m micro-batches, v chunks per rank (each chunk one virtual stage), S = p v
stages.

Given per-stage costs (F, I, W may differ per stage), a link and a per-rank activation limit,
:func:`search_schedule` builds candidate schedules with an event-driven *list scheduler*: each
rank, whenever it is free, picks among the actions whose inputs have arrived, by priority

1. an input-gradient I (it unblocks the previous rank), then
2. a forward F, if the memory limit admits it, then
3. a weight-gradient W, to fill a gap: only if it ends before the next known I or F can start
   (plus some slack), or when memory is full and only a W can free it.

A new micro-batch is admitted to a rank (its first forward there) only when the memory for all
of that rank's chunks of it is available (a banker's rule), so the construction never deadlocks
and never exceeds the limit. Variants of the priorities (I or F first, which chunk first, how
much W slack, a 1F1B-like cap on admitted micro-batches per rank, feeding the rank with the
most work left first) and seeded random variants are tried; then a local search (swap two
adjacent actions of a rank, or move a W; half of the moves on the rank that finishes last)
walks from the best one, keeping moves that do not lengthen the step. Every candidate is timed
by :func:`stagewise.sim.simulate`, the simulator the rest of stagewise uses, and checked
against the memory limit. Every registered named schedule with the same number of stages and
placement that fits the limit is evaluated too, and the best of all is returned, so the result
is never worse than the best named schedule under the same limit.

The lower bound reported is the largest per-rank busy time, m times the rank's F + B summed
over its stages: no schedule finishes before its busiest rank has done its work.
:func:`fill_bound` adds each rank's unavoidable wait for the first forward, a tighter bound.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import NamedTuple

from stagewise.errors import ConfigError, ScheduleError
from stagewise.schedules.ir import Op, Schedule
from stagewise.schedules.registry import build, get, names
from stagewise.search.bounds import lower_bound
from stagewise.search.list_scheduler import ListScheduler, Policy, fixed_policies, random_policy
from stagewise.sim.costs import Costs, Link
from stagewise.sim.simulate import simulate

__all__ = ["ScheduleSearchResult", "search_schedule"]

_EPS = 1e-9
_MIN_FIXED = 8  # fixed list-scheduling variants started whatever the 60 % mark of the budget


class ScheduleSearchResult(NamedTuple):
    """What :func:`search_schedule` returns; unpacks as ``schedule, makespan, lower_bound``.

    Attributes:
        schedule: the best schedule found; its name says where it came from (``"auto"`` for a
            list-scheduled one, ``"auto:<name>"`` when a named schedule was best).
        makespan: its simulated step time under the given costs and link.
        lower_bound: the largest per-rank busy time (see :func:`lower_bound`).
    """

    schedule: Schedule
    makespan: float
    lower_bound: float


def _placements(num_ranks: int, num_stages: int, placement: str | None) -> list[tuple[int, ...]]:
    if num_stages % num_ranks:
        raise ConfigError(
            f"costs describe {num_stages} stages, not a multiple of p={num_ranks} ranks: give "
            "v costs per rank (one per stage)"
        )
    v = num_stages // num_ranks
    looped = tuple(s % num_ranks for s in range(num_stages))
    vee = tuple(range(num_ranks)) + tuple(reversed(range(num_ranks)))
    if placement == "looped":
        return [looped]
    if placement == "v":
        if v != 2:
            raise ConfigError(
                f"V placement needs exactly 2 stages per rank (2p = {2 * num_ranks} stage "
                f"costs), got {num_stages}: give 2p stage costs or use placement='looped'"
            )
        return [vee]
    if placement is None:
        return [looped, vee] if v == 2 and num_ranks > 1 else [looped]
    raise ConfigError(f"placement must be 'looped', 'v' or None, got {placement!r}")


def _named(num_ranks: int, num_microbatches: int,
           placement: tuple[int, ...]) -> Iterator[Schedule]:
    """The registered schedules (``auto`` aside) with this placement, built one at a time."""
    v = len(placement) // num_ranks
    for name in names():
        if name == "auto":
            continue
        generator = get(name)
        if generator.fixed_chunks is not None and generator.fixed_chunks != v:
            continue
        try:
            schedule = build(name, num_ranks=num_ranks, num_microbatches=num_microbatches,
                             num_chunks=v)
        except ScheduleError:
            continue  # this m (or v) is not one the schedule runs
        if schedule.placement == placement:
            yield schedule


def _evaluate(schedule: Schedule, costs: Costs, link: Link,
              limit: float | None) -> tuple[float, float, int] | None:
    """(makespan, sum of the ranks' finishing times, last rank), None above the memory limit.

    The second figure breaks ties: of two equally long schedules, the one whose ranks finish
    earlier has more room to shorten, which lets the local search cross plateaus. The last
    rank to finish is where the local search moves most often.
    """
    timeline = simulate(schedule, costs, link)
    if limit is not None:
        peak = max(timeline.peak_activations(r) for r in range(schedule.num_ranks))
        if peak > limit + _EPS:
            return None
    ends = [max((e.end for e in timeline.rank_events(r)), default=0.0)
            for r in range(schedule.num_ranks)]
    return timeline.makespan, sum(ends), ends.index(max(ends))


def _moved(schedule: Schedule, rng: random.Random, focus: int) -> Schedule | None:
    """A neighbour of ``schedule``: two adjacent actions of one rank swapped, or a W moved.

    Half of the moves are on rank ``focus`` (the one that finishes last).
    """
    rank = focus if rng.random() < 0.5 else rng.randrange(schedule.num_ranks)
    row = list(schedule.actions[rank])
    if len(row) < 2:
        return None
    if rng.random() < 0.5:
        k = rng.randrange(len(row) - 1)
        row[k], row[k + 1] = row[k + 1], row[k]
    else:
        weights = [k for k, a in enumerate(row) if a.op is Op.W]
        if not weights:
            return None
        action = row.pop(rng.choice(weights))
        row.insert(rng.randrange(len(row) + 1), action)
    rows = list(schedule.actions)
    rows[rank] = tuple(row)
    return Schedule("auto", schedule.num_ranks, schedule.num_stages,
                    schedule.num_microbatches, schedule.placement, tuple(rows))


def search_schedule(
    num_ranks: int,
    num_microbatches: int,
    costs: Costs,
    link: Link | None = None,
    memory_limit: float | None = None,
    placement: str | None = None,
    time_budget_s: float = 2.0,
    max_variants: int | None = None,
    max_moves: int | None = None,
    seed: int = 0,
) -> ScheduleSearchResult:
    """Find a schedule for these costs that fits ``memory_limit``, as fast as possible.

    Runs every named schedule with the same stages and placement, the fixed then seeded random
    list-scheduling variants, then a local search (swaps, W moves) from the best found.

    Args:
        num_ranks: p.
        num_microbatches: m.
        costs: per-stage costs; their number of stages S fixes v = S / p chunks per rank.
        link: point-to-point cost between ranks (default free).
        memory_limit: most live activations a rank may hold, in stage-micro-batch units (a
            chunk's micro-batch is 1/v); ``None`` for no limit.
        placement: ``"looped"`` (stage s on rank s mod p), ``"v"`` (2 stages per rank, rank r
            holds r and 2p - 1 - r) or ``None`` (both when S = 2p).
        time_budget_s: seconds for the search beyond the named schedules (always judged),
            to within one simulation: 60 % list scheduling (the first few fixed variants
            start in any case), then local search. Once anything is found, every phase stops
            at the budget (a run in progress too) and the best so far is returned.
        max_variants: when given, the list-scheduling phase ignores the clock: every fixed
            variant and this many random ones run.
        max_moves: when given, the local search ignores the clock and tries this many moves
            (default: as many as the budget allows, or ``max_variants`` moves when that is
            given). Give both for a result that does not depend on the machine's speed.
        seed: seed of the random variants and moves.

    Returns:
        ``ScheduleSearchResult(schedule, makespan, lower_bound)``; the makespan is never above
        any registered named schedule's with the same stages and placement that fits.

    Raises:
        ConfigError: sizes or costs that do not fit together, a memory limit below one unit,
            or no candidate within the limit.

    Example:
        >>> from stagewise.sim import Costs
        >>> costs = Costs.per_stage([1.0] * 4, [2.0] * 4, [1.0] * 4)
        >>> found = search_schedule(4, 8, costs, memory_limit=4, max_variants=0)
        >>> found.makespan, found.lower_bound
        (27.0, 24.0)
    """
    _check_arguments(num_ranks, num_microbatches, memory_limit)
    link = link or Link()
    layouts = _placements(num_ranks, costs.num_stages, placement)
    v = costs.num_stages // num_ranks
    clock = time.monotonic()
    search = _Search(
        num_ranks, num_microbatches, costs, link, memory_limit,
        limit_chunks=10**9 if memory_limit is None else int(memory_limit * v + _EPS),
        deadline=None if max_variants is not None else clock + time_budget_s,
    )
    # Every named schedule is judged whatever the clock says: the result is never worse than
    # them. The budget bounds the search beyond them.
    for layout in layouts:
        for schedule in _named(num_ranks, num_microbatches, layout):
            search.consider(schedule, f"auto:{schedule.name}")
    budget = None if max_variants is not None else (clock, time_budget_s)
    rng = random.Random(seed)
    _list_schedule(search, layouts, budget, max_variants, rng)
    if max_moves is None and max_variants is not None:
        max_moves = max_variants
    _local_search(search, budget, max_moves, rng)
    if search.best is None:
        raise ConfigError(
            f"no schedule for p={num_ranks}, m={num_microbatches} fits a memory limit of "
            f"{memory_limit} units: raise the limit"
        )
    bound = min(lower_bound(layout, num_microbatches, costs) for layout in layouts)
    return ScheduleSearchResult(search.best[1], search.best[0][0], bound)


def _check_arguments(num_ranks: int, num_microbatches: int,
                     memory_limit: float | None) -> None:
    if num_ranks < 1 or num_microbatches < 1:
        raise ConfigError(f"p and m must be >= 1, got p={num_ranks}, m={num_microbatches}")
    if memory_limit is not None and memory_limit < 1 - _EPS:
        raise ConfigError(
            f"memory limit {memory_limit} is below one stage-micro-batch unit: every rank must "
            "hold at least one micro-batch's activations; give --memory-limit >= 1"
        )


def _list_schedule(search: _Search, layouts: list[tuple[int, ...]],
                   budget: tuple[float, float] | None, max_variants: int | None,
                   rng: random.Random) -> None:
    """List scheduling: the fixed variants, then random ones, within 60 % of the budget
    (``(start, seconds)``; None: every fixed variant and ``max_variants`` random ones)."""

    def in_budget() -> bool:
        return budget is None or time.monotonic() - budget[0] < 0.6 * budget[1]

    fixed = [(layout, policy) for policy in fixed_policies() for layout in layouts]
    for k, (layout, policy) in enumerate(fixed):
        if search.out_of_time() or (k >= _MIN_FIXED and not in_budget()):
            break
        search.consider(search.list_scheduled(layout, policy), "auto")
    tried = 0
    while (tried < max_variants) if max_variants is not None else in_budget():
        search.consider(search.list_scheduled(layouts[tried % len(layouts)],
                                              random_policy(rng)), "auto")
        tried += 1


def _local_search(search: _Search, budget: tuple[float, float] | None,
                  max_moves: int | None, rng: random.Random) -> None:
    """Moves on the best schedule until the budget ends (or ``max_moves`` when given)."""
    moves = 0
    while search.best and ((moves < max_moves) if max_moves is not None else (
            budget is None or time.monotonic() - budget[0] < budget[1])):
        score, schedule = search.best
        search.consider(_moved(schedule, rng, score[2]), "auto", sideways=True)
        moves += 1


class _Search:
    """The best candidate so far, and how to make and judge more of them.

    ``deadline`` (a :func:`time.monotonic` time, None when the search ignores the clock) stops
    list-scheduling runs in their stride, but only once a candidate has been found: the search
    always returns a schedule.
    """

    def __init__(self, num_ranks: int, num_microbatches: int, costs: Costs, link: Link,
                 memory_limit: float | None, limit_chunks: int,
                 deadline: float | None) -> None:
        self.num_ranks, self.num_microbatches = num_ranks, num_microbatches
        self.costs, self.link, self.memory_limit = costs, link, memory_limit
        self.limit_chunks, self.deadline = limit_chunks, deadline
        self.best: tuple[tuple[float, float, int], Schedule] | None = None

    def out_of_time(self) -> bool:
        """True once the deadline has passed and there is something to return."""
        return (self.deadline is not None and self.best is not None
                and time.monotonic() > self.deadline)

    def list_scheduled(self, layout: tuple[int, ...], policy: Policy) -> Schedule | None:
        """One list-scheduling run; None when it gets stuck or runs out of time."""
        scheduler = ListScheduler(self.num_ranks, self.num_microbatches, layout, self.costs,
                                  self.link, self.limit_chunks, policy)
        return scheduler.run(self.deadline if self.best is not None else None)

    def consider(self, schedule: Schedule | None, label: str, sideways: bool = False) -> None:
        """Keep ``schedule`` if it beats the best; ``sideways`` also keeps equal ones."""
        if schedule is None:
            return
        try:
            score = _evaluate(schedule, self.costs, self.link, self.memory_limit)
        except ScheduleError:
            return  # a local-search move that deadlocks
        if score is None:
            return
        if self.best is not None:
            makespan, finish, _ = self.best[0]
            if score[0] > makespan + _EPS:
                return
            if score[0] > makespan - _EPS and score[1] > finish - _EPS and not (
                    sideways and score[1] < finish + _EPS):
                return
        self.best = (score, _renamed(schedule, label))


def _renamed(schedule: Schedule, name: str) -> Schedule:
    return Schedule(
        name=name,
        num_ranks=schedule.num_ranks,
        num_stages=schedule.num_stages,
        num_microbatches=schedule.num_microbatches,
        placement=schedule.placement,
        actions=schedule.actions,
    )
