"""List scheduling: build a schedule action by action, each rank picking by priority.

Notation: p ranks, m micro-batches, v chunks per rank (each chunk one virtual stage).

An event-driven construction: whenever a rank is free it picks, among the actions whose
inputs have arrived (with the link's latency), first an input-gradient I (it unblocks the
previous rank), then a forward F if the memory limit admits it, then a weight-gradient W to
fill a gap (only if it ends before the next known I or F can start, plus some slack, or when
memory is full and only a W can free it). A new micro-batch is admitted to a rank (its first
forward there) only when the memory for all of that rank's chunks of it is available (a
banker's rule), so the construction never deadlocks and never exceeds the limit.

:class:`Policy` holds the knobs one construction uses; :func:`fixed_policies` and
:func:`random_policy` give the variants :mod:`stagewise.search.schedule_search` tries.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from stagewise.schedules.ir import Action, Op, Schedule
from stagewise.sim.costs import Costs, Link

__all__ = ["ListScheduler", "Policy", "fixed_policies", "random_policy"]

_EPS = 1e-9
_CLOCK_EVERY = 256  # steps between looks at the deadline


@dataclass(frozen=True)
class Policy:
    """One variant of the list scheduler's priorities (see the module docstring)."""

    input_first: bool = True  # I before F when both are ready
    deep_first: bool = True  # among ready F (or I), the later stage first
    weight_slack: float | None = 0.0  # W only if it ends by next I/F + slack * W; None: eager
    cap: Callable[[int, int], float] | None = None  # (rank, p) -> admitted micro-batches cap
    feed_busiest: bool = False  # first the action whose consumer rank has the most work left


class ListScheduler:
    """One run of the list scheduler for one placement and one policy.

    ``limit_chunks`` is the per-rank memory limit in chunks (stage-micro-batch units times v).
    """

    def __init__(self, p: int, m: int, placement: tuple[int, ...], costs: Costs, link: Link,
                 limit_chunks: int, policy: Policy) -> None:
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
        self.free_at = [0.0] * p
        self.rows: list[list[Action]] = [[] for _ in range(p)]
        self.remaining = [0.0] * p  # compute time each rank has still to do
        for stage, rank in enumerate(placement):
            self.remaining[rank] += m * (costs.forward[stage] + costs.backward[stage])

    def _cap(self, rank: int) -> int:
        limit = self.limit_chunks
        if self.policy.cap is not None:
            limit = min(limit, round(self.policy.cap(rank, self.p) * self.v))
        return max(limit, self.v)

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

    def run(self, deadline: float | None = None) -> Schedule | None:
        """Build the rows; None when the policy gets stuck (it then yields no candidate).

        ``deadline`` (a :func:`time.monotonic` time) abandons the construction, also None,
        once passed; it is looked at every few hundred steps.
        """
        total = 3 * self.num_stages * self.m
        choices: list[tuple[Action, float] | None] = [None] * self.p
        dirty = set(range(self.p))
        for step in range(total):
            if deadline is not None and not step % _CLOCK_EVERY and time.monotonic() > deadline:
                return None
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


def fixed_policies() -> list[Policy]:
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
         Policy(input_first, deep_first, slack, caps[c], feed_busiest))
        for feed_busiest in (False, True)
        for c in range(len(caps))
        for k, slack in enumerate(slacks)
        for input_first in (True, False)
        for deep_first in (True, False)
    ]
    policies.sort(key=lambda entry: entry[:5])
    return [entry[5] for entry in policies]


def random_policy(rng: random.Random) -> Policy:
    """A random variant: random priorities, W slack and a random per-rank admission cap."""
    cap_base = rng.uniform(0.5, 2.5)
    cap_slope = rng.uniform(0.0, 2.0)
    return Policy(
        input_first=rng.random() < 0.8,
        deep_first=rng.random() < 0.5,
        weight_slack=None if rng.random() < 0.15 else rng.uniform(0.0, 1.5),
        cap=lambda r, p: max(1.0, cap_base * p - cap_slope * r),
        feed_busiest=rng.random() < 0.5,
    )
