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

Storage: each rank's events are kept as columns (its actions, their starts, their ends); the
:class:`Event` tuples are built only when someone reads them, since the bubble, the idle time
and the activation levels need only the columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import InitVar, dataclass, field
from functools import cached_property
from operator import itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple, overload

import numpy as np

from stagewise.schedules.ir import Op, Schedule
from stagewise.sim._columns import Row, SimulatedRows, in_order

__all__ = ["Bubble", "Event", "RankStats", "SimulatedRows", "Timeline"]

# An op's letter as a byte: F allocates activations at its start, B or W frees them at its end.
_LETTER_F, _LETTER_B, _LETTER_W = (ord(op.value) for op in (Op.F, Op.B, Op.W))


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


class _Events:
    """The ``events`` field of a :class:`Timeline`: the tuple it was given, or, for a simulated
    timeline (given the simulator's columns), the events built from the columns on first read,
    in the simulator's execution order."""

    @overload
    def __get__(self, timeline: None, owner: Any) -> _Events: ...
    @overload
    def __get__(self, timeline: Timeline, owner: Any) -> tuple[Event, ...]: ...
    def __get__(self, timeline: Timeline | None, owner: Any = None) -> tuple[Event, ...] | _Events:
        if timeline is None:
            raise AttributeError("events has no default")  # the dataclass field is required
        events: tuple[Event, ...] | None = timeline.__dict__["_events"]
        if events is None:
            assert timeline._simulated is not None, "only a simulated timeline waits for them"
            events = in_order([row.events() for row in timeline._rows], timeline._simulated)
            timeline.__dict__["_events"] = events
        return events

    def __set__(self, timeline: Timeline, events: Iterable[Event]) -> None:
        timeline.__dict__["_events"] = tuple(events)


@dataclass(frozen=True)
class Timeline:
    """The events of one step and the sizes needed to read them.

    Attributes:
        events: one per action, in any order (the producer's); for a simulated timeline,
            built from its columns on first read.
        num_ranks, num_stages, num_microbatches, num_chunks: the schedule's sizes.
        schedule_name: which schedule ran.
        source: ``"simulated"`` or ``"measured"``.
        time_unit: ``"cost"`` (simulator cost units) or ``"s"``.
        activation_bytes: bytes one micro-batch's activations take through each stage,
            when known (per stage, len num_stages).
        rows: (init only) the same events grouped by rank, each row sorted by (start, end),
            when the producer has them; grouped here when omitted.
        simulated: (init only) the simulator's columns, read in place of ``events`` and
            ``rows`` (give ``events=()``); the events are then built from them when first read.
    """

    if TYPE_CHECKING:
        events: tuple[Event, ...]
    else:  # the same field, read through _Events (which gives it no default)
        events: _Events = _Events()
    num_ranks: int
    num_stages: int
    num_microbatches: int
    num_chunks: int
    schedule_name: str
    source: str = "simulated"
    time_unit: str = "cost"
    activation_bytes: tuple[float, ...] | None = None
    rows: InitVar[Sequence[Sequence[Event]] | None] = None
    simulated: InitVar[SimulatedRows | None] = None
    _rows: tuple[Row, ...] = field(init=False, repr=False, compare=False)
    _simulated: SimulatedRows | None = field(init=False, repr=False, compare=False,
                                             default=None)

    def __post_init__(self, rows: Sequence[Sequence[Event]] | None,
                      simulated: SimulatedRows | None) -> None:
        if simulated is not None:
            if self.__dict__["_events"]:
                raise ValueError("a Timeline takes its events or the simulator's columns, not "
                                 "both: pass events=() with simulated=")
            unknown: list[np.ndarray | None] = [None] * len(simulated.actions)
            columns = zip(simulated.actions, simulated.starts, simulated.ends,
                          simulated.letters or unknown, simulated.stages or unknown, strict=True)
            ranked = tuple(Row(rank, actions, starts, ends, letters=letters, stages=stages)
                           for rank, (actions, starts, ends, letters, stages)
                           in enumerate(columns))
            object.__setattr__(self, "_simulated", simulated)
            self.__dict__["_events"] = None  # built from the columns on first read
        else:
            by_rank = _by_rank(self.events, self.num_ranks) if rows is None else rows
            ranked = tuple(Row.of_events(rank, row) for rank, row in enumerate(by_rank))
        object.__setattr__(self, "_rows", ranked)

    @classmethod
    def of(
        cls,
        schedule: Schedule,
        events: Iterable[Event],
        source: str = "simulated",
        time_unit: str = "cost",
        activation_bytes: tuple[float, ...] | None = None,
        rows: Sequence[Sequence[Event]] | None = None,
        simulated: SimulatedRows | None = None,
    ) -> Timeline:
        """A Timeline of ``events`` with the sizes and name taken from ``schedule``; ``rows``
        as in the class. With ``simulated`` (the simulator's columns) the events are built
        from the columns when first read, and ``events`` must be empty (pass ``()``)."""
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
            simulated=simulated,
        )

    # --- time ------------------------------------------------------------------------------

    def rank_events(self, rank: int) -> tuple[Event, ...]:
        """Events of ``rank`` sorted by start time."""
        return self._rows[rank].events()

    @cached_property
    def _busy(self) -> tuple[float, ...]:
        # Each row's end - start added one after another (np.add.accumulate adds in order)
        busy = []
        for row in self._rows:
            starts, ends = row.times()
            busy.append(float(np.add.accumulate(ends - starts)[-1]) if len(ends) else 0.0)
        return tuple(busy)

    @cached_property
    def _span(self) -> tuple[float, float]:
        first = min((float(row.starts[0]) for row in self._rows if len(row.starts)),
                    default=0.0)
        last = max((float(row.times()[1].max()) for row in self._rows if len(row.ends)),
                   default=0.0)
        return first, last

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
        times, levels = self._level_arrays(rank, in_bytes)
        return [(self.start, 0.0), *zip(times.tolist(), levels.tolist(), strict=True)]

    def _level_arrays(self, rank: int, in_bytes: bool) -> tuple[np.ndarray, np.ndarray]:
        """The times the level of ``rank`` changes and the level after each change: a forward
        allocates when it starts; B, or W when split (never both), frees when it ends.
        Changes are ordered by (time, frees before allocations, size), the levels summed one
        change after another (np.cumsum adds in order), so they are the same floats as a
        running sum in Python."""
        if in_bytes and self.activation_bytes is None:
            raise ValueError("this timeline has no activation sizes; pass activation_bytes")
        size = self.activation_bytes if in_bytes else [1.0 / self.num_chunks] * self.num_stages
        assert size is not None
        row = self._rows[rank]
        if not row.actions:
            return np.empty(0), np.empty(0)
        letters, (starts, ends) = row.letters(), row.times()
        if len(set(size)) == 1:  # one size (always, in stage-micro-batch units)
            sizes = np.full(len(letters), size[0], dtype=np.float64)
        else:
            sizes = np.asarray(size, dtype=np.float64)[row.stages()]
        allocates = letters == _LETTER_F
        frees = (letters == _LETTER_B) | (letters == _LETTER_W)
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
