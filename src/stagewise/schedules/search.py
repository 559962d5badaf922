"""Schedule search: list scheduling under a memory limit, never worse than the named schedules.

Notation: p ranks, m micro-batches, v chunks (stages) per rank, S = p v stages.

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
much W slack, a 1F1B-like cap on admitted micro-batches per rank) and seeded random variants
are tried within a time budget; every candidate is timed by :func:`stagewise.sim.simulate`,
the same simulator the rest of stagewise uses. Every registered named schedule with the same
number of stages and placement that fits the limit is evaluated too, and the best of all is
returned, so the result is never worse than the best named schedule under the same limit.

The lower bound is the largest per-rank busy time, m times the rank's F + B summed over its
stages: no schedule can finish before its busiest rank has done its work.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from stagewise.errors import ConfigError, ScheduleError
from stagewise.schedules.ir import Action, Op, Schedule
from stagewise.sim.costs import Costs, Link
from stagewise.sim.simulate import simulate

__all__ = ["SearchResult", "fill_bound", "lower_bound", "search_schedule"]

_EPS = 1e-9
_MIN_FIXED = 8  # fixed list-scheduling variants that run whatever the time budget


class SearchResult(NamedTuple):
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


@dataclass(frozen=True)
class _Policy:
    """One variant of the list scheduler's priorities."""

    input_first: bool = True  # I before F when both are ready
    deep_first: bool = True  # among ready F (or I), the later stage first
    weight_slack: float | None = 0.0  # W only if it ends by next I/F + slack * W; None: eager
    cap: Callable[[int, int], float] | None = None  # (rank, p) -> admitted micro-batches cap
    feed_busiest: bool = False  # first the action whose consumer rank has the most work left


def lower_bound(placement: tuple[int, ...], num_microbatches: int, costs: Costs) -> float:
    """The largest per-rank busy time: m x sum of F + B over the rank's stages."""
    busy = [0.0] * (max(placement) + 1)
    for stage, rank in enumerate(placement):
        busy[rank] += num_microbatches * (costs.forward[stage] + costs.backward[stage])
    return max(busy)


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


class _Builder:
    """One run of the list scheduler for one placement and one policy."""

    def __init__(self, p: int, m: int, placement: tuple[int, ...], costs: Costs, link: Link,
                 limit_chunks: int, policy: _Policy) -> None:
        self.p, self.m, self.placement, self.policy = p, m, placement, policy
        self.num_stages = len(placement)
        self.v = self.num_stages // p
        self.costs = costs
        self.hop = [link.transfer_time(costs.send_bytes[s] if costs.send_bytes else 0.0)
                    for s in range(self.num_stages)]
        self.stages_of = [[s for s in range(self.num_stages) if placement[s] == r]
                          for r in range(p)]
        self.limit_chunks = limit_chunks
        self.caps = [self._cap(r) for r in range(p)]
        self.f_end: dict[tuple[int, int], float] = {}
        self.i_end: dict[tuple[int, int], float] = {}
        self.f_next = [0] * self.num_stages
        self.i_next = [0] * self.num_stages
        self.weights: list[list[tuple[int, int]]] = [[] for _ in range(p)]
        self.live = [0] * p  # chunks allocated and not yet freed
        self.reserved = [0] * p  # chunks admitted micro-batches will still allocate
        self.admitted = [0] * p  # micro-batches with live activations on the rank
        self.freed_mb: list[dict[int, int]] = [{} for _ in range(p)]
        self.free_at = [0.0] * p
        self.rows: list[list[Action]] = [[] for _ in range(p)]
        self.remaining = [0.0] * p  # compute time each rank has still to do
        for stage, rank in enumerate(placement):
            self.remaining[rank] += m * (costs.forward[stage] + costs.backward[stage])

    def _cap(self, rank: int) -> int:
        chunks = self.limit_chunks
        if self.policy.cap is not None:
            chunks = min(chunks, round(self.policy.cap(rank, self.p) * self.v))
        return max(chunks, self.v)

    # --- readiness -----------------------------------------------------------------------

    def _forward_ready(self, stage: int) -> float | None:
        j = self.f_next[stage]
        if j >= self.m:
            return None
        if stage == 0:
            return 0.0
        end = self.f_end.get((stage - 1, j))
        if end is None:
            return None
        return end + (self.hop[stage - 1] if self.placement[stage - 1] != self.placement[stage]
                      else 0.0)

    def _input_ready(self, stage: int) -> float | None:
        j = self.i_next[stage]
        if j >= self.m or j >= self.f_next[stage]:
            return None
        ready = self.f_end[(stage, j)]
        if stage + 1 < self.num_stages:
            end = self.i_end.get((stage + 1, j))
            if end is None:
                return None
            if self.placement[stage + 1] != self.placement[stage]:
                end += self.hop[stage]
            ready = max(ready, end)
        return ready

    def _admits(self, rank: int, stage: int) -> bool:
        if stage != self.stages_of[rank][0]:
            return True  # its chunk was reserved when the micro-batch was admitted
        need = self.live[rank] + self.reserved[rank] + self.v
        return need <= self.caps[rank]

    # --- one decision ----------------------------------------------------------------------

    def _candidates(self, rank: int) -> list[tuple[float, tuple[float, ...], Action]]:
        """Known I and admissible F of ``rank``: (ready time, priority key, action)."""
        found = []
        order = self.stages_of[rank][::-1] if self.policy.deep_first else self.stages_of[rank]
        for position, s in enumerate(order):
            t = self._input_ready(s)
            if t is not None:
                consumer = self.placement[s - 1] if s > 0 else rank
                found.append((t, self._key(Op.I, consumer, position),
                              Action(s, Op.I, self.i_next[s])))
            t = self._forward_ready(s)
            if t is not None and self._admits(rank, s):
                consumer = self.placement[s + 1] if s + 1 < self.num_stages else rank
                found.append((t, self._key(Op.F, consumer, position),
                              Action(s, Op.F, self.f_next[s])))
        return found

    def _key(self, op: Op, consumer: int, position: int) -> tuple[float, ...]:
        kind = 0 if (op is Op.I) == self.policy.input_first else 1
        if self.policy.feed_busiest:  # feed the rank with the most work left first
            return (-self.remaining[consumer], kind, position)
        return (kind, position)

    def _choose(self, rank: int, now: float) -> tuple[Action, float] | None:
        """The action ``rank`` starts at ``now`` or later, and its start; None if none known."""
        candidates = self._candidates(rank)
        ready = [(key, a) for t, key, a in candidates if t <= now + _EPS]
        if ready:
            return min(ready)[1], now
        upcoming = min((t for t, _, _ in candidates), default=None)
        if self.weights[rank]:
            s, j = self.weights[rank][0]
            w = self.costs.weight[s]
            slack = self.policy.weight_slack
            blocked = not any(a.op is Op.F for _, _, a in candidates) and any(
                self._forward_ready(x) is not None for x in self.stages_of[rank])
            if (upcoming is None or slack is None or blocked
                    or now + w <= upcoming + slack * w + _EPS):
                return Action(s, Op.W, j), max(now, self.i_end[(s, j)])
        if upcoming is None:
            return None
        return min((key, a) for t, key, a in candidates if t <= upcoming + _EPS)[1], upcoming

    def _commit(self, rank: int, action: Action, start: float) -> None:
        s, j = action.stage, action.microbatch
        end = start + self.costs.duration(s, action.op)
        self.free_at[rank] = end
        self.remaining[rank] -= end - start
        self.rows[rank].append(action)
        if action.op is Op.F:
            self.f_next[s] += 1
            self.f_end[(s, j)] = end
            self.live[rank] += 1
            if s == self.stages_of[rank][0]:
                self.reserved[rank] += self.v - 1
            else:
                self.reserved[rank] -= 1
        elif action.op is Op.I:
            self.i_next[s] += 1
            self.i_end[(s, j)] = end
            self.weights[rank].append((s, j))
        else:
            self.weights[rank].pop(0)
            self.live[rank] -= 1

    def run(self) -> Schedule | None:
        """Build the rows; None when the policy gets stuck (it then yields no candidate)."""
        total = 3 * self.num_stages * self.m
        choices: list[tuple[Action, float] | None] = [None] * self.p
        dirty = set(range(self.p))
        for _ in range(total):
            for rank in dirty:  # only ranks whose inputs or state changed choose again
                choices[rank] = self._choose(rank, self.free_at[rank])
            dirty.clear()
            best: tuple[float, int, Action] | None = None
            for rank, choice in enumerate(choices):
                if choice is not None and (best is None or choice[1] < best[0] - _EPS):
                    best = (choice[1], rank, choice[0])
            if best is None:
                return None
            start, rank, action = best
            self._commit(rank, action, start)
            dirty.add(rank)
            stage = action.stage
            if action.op is Op.F and stage + 1 < self.num_stages:
                dirty.add(self.placement[stage + 1])
            if action.op is Op.I and stage > 0:
                dirty.add(self.placement[stage - 1])
        return Schedule(
            name="auto",
            num_ranks=self.p,
            num_stages=self.num_stages,
            num_microbatches=self.m,
            placement=self.placement,
            actions=tuple(tuple(row) for row in self.rows),
        )


def _policies() -> list[_Policy]:
    """The fixed variants, the ones that most often won on a grid of sizes and costs first.

    (I first, later chunk first, eager or half-slack W, no cap or a 2p - 1 cap won most of 192
    cases of p in {4, 8}, m in {8, 16}, v in {1, 2}, heavy last stage or not, three memory
    limits, with and without latency; every variant won at least once.)
    """
    caps: list[Callable[[int, int], float] | None] = [
        None,
        lambda r, p: 2 * p - 1,
        lambda r, p: p,
        lambda r, p: p - r,
        lambda r, p: 2 * (p - r) - 1,
    ]
    slacks: list[float | None] = [None, 0.5, 0.0]
    policies = [
        (not input_first, not deep_first, feed_busiest, c, k,
         _Policy(input_first, deep_first, slack, caps[c], feed_busiest))
        for feed_busiest in (False, True)
        for c in range(len(caps))
        for k, slack in enumerate(slacks)
        for input_first in (True, False)
        for deep_first in (True, False)
    ]
    policies.sort(key=lambda entry: entry[:5])
    return [entry[5] for entry in policies]


def _random_policy(rng: random.Random) -> _Policy:
    cap_base = rng.uniform(0.5, 2.5)
    cap_slope = rng.uniform(0.0, 2.0)
    return _Policy(
        input_first=rng.random() < 0.8,
        deep_first=rng.random() < 0.5,
        weight_slack=None if rng.random() < 0.15 else rng.uniform(0.0, 1.5),
        cap=lambda r, p: max(1.0, cap_base * p - cap_slope * r),
        feed_busiest=rng.random() < 0.5,
    )


def _named(num_ranks: int, num_microbatches: int, placement: tuple[int, ...]) -> list[Schedule]:
    from stagewise.schedules.registry import build, get, names

    v = len(placement) // num_ranks
    found = []
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
            found.append(schedule)
    return found


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


def fill_bound(placement: tuple[int, ...], num_microbatches: int, costs: Costs,
               link: Link | None = None) -> float:
    """A tighter bound than :func:`lower_bound`: each rank's busy time plus its fill.

    Rank r cannot start before micro-batch 0's forward reaches its first stage (the forwards of
    the earlier stages and the hops between ranks), so no step is shorter than the largest
    (that fill + rank r's busy time). For uniform costs on one chunk per rank this is
    m (F + B) + (p - 1) F, which ZB-H1 reaches when F = I = W.
    """
    link = link or Link()
    num_ranks = max(placement) + 1
    arrival = [0.0] * len(placement)
    for stage in range(1, len(placement)):
        hop = 0.0
        if placement[stage] != placement[stage - 1]:
            hop = link.transfer_time(costs.send_bytes[stage - 1] if costs.send_bytes else 0.0)
        arrival[stage] = arrival[stage - 1] + costs.forward[stage - 1] + hop
    busy = [0.0] * num_ranks
    head = [float("inf")] * num_ranks
    for stage, rank in enumerate(placement):
        busy[rank] += num_microbatches * (costs.forward[stage] + costs.backward[stage])
        head[rank] = min(head[rank], arrival[stage])
    return max(h + b for h, b in zip(head, busy, strict=True))


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
) -> SearchResult:
    """Find a schedule for these costs that fits ``memory_limit``, as fast as possible.

    Runs, in order: every registered named schedule with the same stages and placement; the
    fixed list-scheduling variants; seeded random variants; then a local search (adjacent swaps
    and W moves, kept when the simulated makespan drops) from the best found.

    Args:
        num_ranks: p.
        num_microbatches: m.
        costs: per-stage costs; their number of stages S fixes v = S / p chunks per rank.
        link: point-to-point cost between ranks (default free).
        memory_limit: most live activations a rank may hold, in stage-micro-batch units (a
            chunk's micro-batch is 1/v); ``None`` for no limit.
        placement: ``"looped"`` (stage s on rank s mod p), ``"v"`` (2 stages per rank, rank r
            holds r and 2p - 1 - r) or ``None`` (both when S = 2p).
        time_budget_s: wall-clock budget. The named schedules and the first few fixed variants
            always run; the rest stop at the budget (about 60 % for list scheduling, the rest
            for local search).
        max_variants: when given, the list-scheduling phase ignores the clock: every fixed
            variant and this many random ones run.
        max_moves: when given, the local search ignores the clock and tries this many moves
            (default: as many as the budget allows, or ``max_variants`` moves when that is
            given). Give both for a result that does not depend on the machine's speed.
        seed: seed of the random variants and moves.

    Returns:
        ``SearchResult(schedule, makespan, lower_bound)``; the makespan is never larger than
        that of any registered named schedule with the same stages and placement that fits.

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
    if num_ranks < 1 or num_microbatches < 1:
        raise ConfigError(f"p and m must be >= 1, got p={num_ranks}, m={num_microbatches}")
    if memory_limit is not None and memory_limit < 1 - _EPS:
        raise ConfigError(
            f"memory limit {memory_limit} is below one stage-micro-batch unit: every rank must "
            "hold at least one micro-batch's activations; give --memory-limit >= 1"
        )
    link = link or Link()
    layouts = _placements(num_ranks, costs.num_stages, placement)
    v = costs.num_stages // num_ranks
    limit_chunks = 10**9 if memory_limit is None else int(memory_limit * v + _EPS)
    clock = time.monotonic()
    best: list[tuple[tuple[float, float, int], Schedule]] = []

    def consider(schedule: Schedule | None, label: str, sideways: bool = False) -> None:
        """Keep ``schedule`` if it beats the best; ``sideways`` also keeps equal ones."""
        if schedule is None:
            return
        try:
            score = _evaluate(schedule, costs, link, memory_limit)
        except ScheduleError:
            return  # a local-search move that deadlocks
        if score is None:
            return
        if best:
            makespan, finish, _ = best[0][0]
            if score[0] > makespan + _EPS:
                return
            if score[0] > makespan - _EPS and score[1] > finish - _EPS and not (
                    sideways and score[1] < finish + _EPS):
                return
        best[:] = [(score, _renamed(schedule, label))]

    def build_with(layout: tuple[int, ...], policy: _Policy) -> Schedule | None:
        return _Builder(num_ranks, num_microbatches, layout, costs, link, limit_chunks,
                        policy).run()

    for layout in layouts:
        for schedule in _named(num_ranks, num_microbatches, layout):
            consider(schedule, f"auto:{schedule.name}")
    fixed = [(layout, policy) for policy in _policies() for layout in layouts]
    for k, (layout, policy) in enumerate(fixed):
        if (max_variants is None and k >= _MIN_FIXED
                and time.monotonic() - clock > 0.6 * time_budget_s):
            break
        consider(build_with(layout, policy), "auto")
    rng = random.Random(seed)
    tried = 0
    while (tried < max_variants) if max_variants is not None else (
            time.monotonic() - clock < 0.6 * time_budget_s):
        consider(build_with(layouts[tried % len(layouts)], _random_policy(rng)), "auto")
        tried += 1
    if max_moves is None and max_variants is not None:
        max_moves = max_variants
    moves = 0
    while best and ((moves < max_moves) if max_moves is not None else (
            time.monotonic() - clock < time_budget_s)):
        consider(_moved(best[0][1], rng, best[0][0][2]), "auto", sideways=True)
        moves += 1
    if not best:
        raise ConfigError(
            f"no schedule for p={num_ranks}, m={num_microbatches} fits a memory limit of "
            f"{memory_limit} units: raise the limit"
        )
    bound = min(lower_bound(layout, num_microbatches, costs) for layout in layouts)
    return SearchResult(best[0][1], best[0][0][0], bound)


def _renamed(schedule: Schedule, name: str) -> Schedule:
    return Schedule(
        name=name,
        num_ranks=schedule.num_ranks,
        num_stages=schedule.num_stages,
        num_microbatches=schedule.num_microbatches,
        placement=schedule.placement,
        actions=schedule.actions,
    )
