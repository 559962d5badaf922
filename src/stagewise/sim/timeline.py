"""``Timeline``: what happened (or would happen) in one pipeline step, one event per action.

The simulator and the runtime both produce a Timeline, so predicted and measured runs are
measured, drawn and compared by the same functions. Times are in whatever unit the producer
used (cost units for the simulator unless given in seconds, seconds for the runtime); the
``time_unit`` field says which.

Bubble fractions, always labelled:
- ``of_step``: idle share of the step, total idle / (ranks x makespan); (p-1)/(m+p-1) for
  GPipe/1F1B with uniform costs.
- ``vs_ideal``: idle time relative to ideal compute, total idle / total busy; (p-1)/m for
  GPipe/1F1B with uniform costs (the lesson's and Megatron's figure). Always
  vs_ideal = of_step / (1 - of_step).

Activation memory is in stage-micro-batch units: one micro-batch's activations for one full
stage (a chunk of a rank with v chunks is 1/v). A forward allocates its units when it starts; the
backward that finishes with them (B, or W when the backward is split) frees them when it ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import InitVar, dataclass, field
from operator import itemgetter, sub
from typing import NamedTuple

import numpy as np

from stagewise.schedules.ir import Op, Schedule

__all__ = ["Bubble", "Event", "RankStats", "Timeline"]

_START, _END = itemgetter(4), itemgetter(5)  # an Event's start and end
_STAGE, _OP = itemgetter(1), itemgetter(2)
# What an op does to live activations: 1 allocates (F, at its start), 0 frees (B or W, at its
# end), -1 neither (I).
_FREES = {Op.F: 1, Op.B: 0, Op.W: 0, Op.I: -1}


def _by_rank(events: Iterable[Event], num_ranks: int) -> list[list[Event]]:
    """``events`` grouped by rank, each row sorted by (start, end) (stable)."""
    by_rank: list[list[Event]] = [[] for _ in range(num_ranks)]
    for event in events:
        by_rank[event.rank].append(event)
    by_time = itemgetter(4, 5)  # (start, end)
    for row in by_rank:
        row.sort(key=by_time)
    return by_rank


class Event(NamedTuple):
    """One action's run: ``op`` of ``microbatch`` through ``stage`` on ``rank``, [start, end).

    A named tuple: the simulator makes hundreds of thousands of them.
    """

    rank: int
    stage: int
    op: Op
    microbatch: int
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def label(self) -> str:
        return f"{self.stage}{self.op.value}{self.microbatch}"


@dataclass(frozen=True)
class Bubble:
    """Bubble fraction both ways (see the module docstring)."""

    of_step: float
    vs_ideal: float

    def describe(self) -> str:
        return (
            f"{self.of_step:.2%} of the step idle; "
            f"{self.vs_ideal:.2%} relative to ideal compute"
        )


@dataclass(frozen=True)
class RankStats:
    """Busy and idle time and peak live activations of one rank."""

    rank: int
    busy: float
    idle: float
    peak_activations: float
    peak_activation_bytes: float | None


@dataclass(frozen=True)
class Timeline:
    """The events of one step and the sizes needed to read them.

    Attributes:
        events: one per action, in any order.
        num_ranks, num_stages, num_microbatches, num_chunks: the schedule's sizes.
        schedule_name: which schedule ran.
        source: ``"simulated"`` or ``"measured"``.
        time_unit: ``"cost"`` (simulator cost units) or ``"s"``.
        activation_bytes: bytes one micro-batch's activations take through each stage,
            when known (per stage, len num_stages).
        rows: (init only) the same events grouped by rank, each row sorted by (start, end),
            when the producer has them (the simulator does); grouped here when omitted.
    """

    events: tuple[Event, ...]
    num_ranks: int
    num_stages: int
    num_microbatches: int
    num_chunks: int
    schedule_name: str
    source: str = "simulated"
    time_unit: str = "cost"
    activation_bytes: tuple[float, ...] | None = None
    rows: InitVar[Sequence[Sequence[Event]] | None] = None
    _by_rank: tuple[tuple[Event, ...], ...] = field(init=False, repr=False, compare=False)
    _busy: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _span: tuple[float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self, rows: Sequence[Sequence[Event]] | None) -> None:
        by_rank = _by_rank(self.events, self.num_ranks) if rows is None else rows
        # sum(e.end - e.start for e in row), the same additions in the same order, in C
        busy = tuple(sum(map(sub, map(_END, row), map(_START, row))) for row in by_rank)
        first = min((row[0].start for row in by_rank if row), default=0.0)
        last = max(map(_END, self.events), default=0.0)
        object.__setattr__(self, "_by_rank", tuple(map(tuple, by_rank)))
        object.__setattr__(self, "_busy", busy)
        object.__setattr__(self, "_span", (first, last))

    @classmethod
    def of(
        cls,
        schedule: Schedule,
        events: Iterable[Event],
        source: str = "simulated",
        time_unit: str = "cost",
        activation_bytes: tuple[float, ...] | None = None,
        rows: Sequence[Sequence[Event]] | None = None,
    ) -> Timeline:
        """A Timeline of ``events`` with the sizes and name taken from ``schedule``; ``rows``
        as in the class (the events by rank, in time order), when known."""
        return cls(
            events=tuple(events),
            num_ranks=schedule.num_ranks,
            num_stages=schedule.num_stages,
            num_microbatches=schedule.num_microbatches,
            num_chunks=schedule.num_chunks,
            schedule_name=schedule.name,
            source=source,
            time_unit=time_unit,
            activation_bytes=activation_bytes,
            rows=rows,
        )

    # --- time ------------------------------------------------------------------------------

    def rank_events(self, rank: int) -> tuple[Event, ...]:
        """Events of ``rank`` sorted by start time."""
        return self._by_rank[rank]

    @property
    def start(self) -> float:
        """Time the first action starts."""
        return self._span[0]

    @property
    def makespan(self) -> float:
        """Time from the first action's start to the last action's end."""
        return self._span[1] - self._span[0]

    def busy(self, rank: int) -> float:
        """Total compute time of ``rank``."""
        return self._busy[rank]

    def idle(self, rank: int) -> float:
        """Time ``rank`` spends not computing within the step."""
        return self.makespan - self.busy(rank)

    def bubble(self) -> Bubble:
        """The bubble fraction of the step, both ways."""
        total = self.num_ranks * self.makespan
        busy = sum(self._busy)
        idle = total - busy
        return Bubble(
            of_step=idle / total if total else 0.0,
            vs_ideal=idle / busy if busy else 0.0,
        )

    # --- memory ----------------------------------------------------------------------------

    def live_activations(self, rank: int, in_bytes: bool = False) -> list[tuple[float, float]]:
        """Live activations of ``rank`` over time as (time, level) steps, starting at 0.

        Levels are stage-micro-batch units, or bytes when ``in_bytes`` (needs
        ``activation_bytes``).
        """
        times, levels = self._levels(rank, in_bytes)
        return [(self.start, 0.0), *zip(times, levels, strict=True)]

    def _levels(self, rank: int, in_bytes: bool) -> tuple[list[float], list[float]]:
        """The times the level of ``rank`` changes, and the level after each change."""
        times, levels = self._level_arrays(rank, in_bytes)
        return times.tolist(), levels.tolist()

    def _level_arrays(self, rank: int, in_bytes: bool) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_levels` as arrays: a forward allocates when it starts; B, or W when split
        (never both), frees when it ends. Changes are ordered by (time, frees before
        allocations, size), the levels summed one change after another (np.cumsum adds in
        order), so they are the same floats as a running sum in Python."""
        if in_bytes and self.activation_bytes is None:
            raise ValueError("this timeline has no activation sizes; pass activation_bytes")
        size = self.activation_bytes if in_bytes else [1.0 / self.num_chunks] * self.num_stages
        assert size is not None
        row = self._by_rank[rank]
        if not row:
            return np.empty(0), np.empty(0)
        n = len(row)
        code = np.fromiter(map(_FREES.__getitem__, map(_OP, row)), dtype=np.int8, count=n)
        stages = np.fromiter(map(_STAGE, row), dtype=np.intp, count=n)
        sizes = np.asarray(size, dtype=np.float64)[stages]
        starts = np.fromiter(map(_START, row), dtype=np.float64, count=n)
        ends = np.fromiter(map(_END, row), dtype=np.float64, count=n)
        allocates, frees = code == 1, code == 0
        time = np.concatenate((starts[allocates], ends[frees]))
        delta = np.concatenate((sizes[allocates], -sizes[frees]))
        kind = np.concatenate((np.ones(int(allocates.sum()), np.int8),
                               np.zeros(int(frees.sum()), np.int8)))
        order = np.lexsort((delta, kind, time))
        return time[order], np.cumsum(delta[order])

    def peak_activations(self, rank: int, in_bytes: bool = False) -> float:
        """Largest live activation level of ``rank`` during the step."""
        levels = self._level_arrays(rank, in_bytes)[1]
        return max(0.0, float(levels.max())) if len(levels) else 0.0  # 0 at the start

    def rank_stats(self) -> list[RankStats]:
        """Busy, idle and peak activations of every rank."""
        makespan = self.makespan
        stats = []
        for rank in range(self.num_ranks):
            busy = self.busy(rank)
            stats.append(
                RankStats(
                    rank=rank,
                    busy=busy,
                    idle=makespan - busy,
                    peak_activations=self.peak_activations(rank),
                    peak_activation_bytes=(
                        self.peak_activations(rank, in_bytes=True)
                        if self.activation_bytes is not None
                        else None
                    ),
                )
            )
        return stats
