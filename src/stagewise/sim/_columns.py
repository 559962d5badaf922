"""A Timeline's storage: each rank's events as columns (actions, starts, ends).

The bubble, idle time and activation levels need only the columns, as numpy arrays; the
:class:`~stagewise.sim.timeline.Event` tuples are built only when someone reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from operator import itemgetter
from typing import TYPE_CHECKING

import numpy as np

from stagewise.schedules.ir import Op

if TYPE_CHECKING:
    from stagewise.sim.timeline import Event

__all__ = ["Row", "SimulatedRows", "in_order"]

_START, _END = itemgetter(4), itemgetter(5)  # an Event's start and end
# An action's stage, op and micro-batch: (stage, op, microbatch), an Action or an Event's middle.
_STAGE, _OP, _MICROBATCH = itemgetter(0), itemgetter(1), itemgetter(2)


@dataclass(frozen=True, eq=False)  # holds numpy arrays: compared by identity
class SimulatedRows:
    """What the simulator hands a :class:`~stagewise.sim.timeline.Timeline`: each rank's
    events as columns.

    Attributes:
        actions: ``actions[rank]``, the rank's row of (stage, op, micro-batch) actions.
        starts, ends: ``starts[rank][k]`` and ``ends[rank][k]``, when ``actions[rank][k]`` ran
            (lists, or numpy arrays).
        runs, order: the order the events were produced in (one of the two): ``(rank,
            first, stop)`` runs of rows, or indices into the rows laid end to end (see
            :func:`stagewise.schedules.validate.execution`).
        letters, stages: each rank's op letters (as bytes) and stages as arrays, when the
            producer has them (otherwise read from ``actions`` when needed).
    """

    actions: Sequence[Sequence[tuple[int, Op, int]]]
    starts: Sequence[Sequence[float] | np.ndarray]
    ends: Sequence[Sequence[float] | np.ndarray]
    runs: Sequence[tuple[int, int, int]] | None = None
    order: np.ndarray | None = None
    letters: Sequence[np.ndarray] | None = None
    stages: Sequence[np.ndarray] | None = None


class Row:
    """One rank's events in time order, as columns; the Event tuples and numpy arrays built
    on first use."""

    __slots__ = ("_events", "_letters", "_stages", "_times", "actions", "ends", "rank",
                 "starts")

    def __init__(self, rank: int, actions: Sequence[tuple[int, Op, int]],
                 starts: Sequence[float] | np.ndarray, ends: Sequence[float] | np.ndarray,
                 events: tuple[Event, ...] | None = None, letters: np.ndarray | None = None,
                 stages: np.ndarray | None = None) -> None:
        self.rank, self.actions, self.starts, self.ends = rank, actions, starts, ends
        self._events, self._letters, self._stages = events, letters, stages
        self._times: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def of_events(cls, rank: int, events: Sequence[Event]) -> Row:
        """The row of ``events`` (one rank's, already in time order)."""
        return cls(rank, list(map(itemgetter(1, 2, 3), events)), list(map(_START, events)),
                   list(map(_END, events)), tuple(events))

    def events(self) -> tuple[Event, ...]:
        """The row's events, in time order."""
        if self._events is None:
            from stagewise.sim.timeline import Event  # the class, to build its tuples in C

            actions = self.actions
            self._events = tuple(map(tuple.__new__, repeat(Event), zip(
                repeat(self.rank), map(_STAGE, actions), map(_OP, actions),
                map(_MICROBATCH, actions), _floats(self.starts), _floats(self.ends),
                strict=False)))
        return self._events

    def letters(self) -> np.ndarray:
        """Each action's op letter, as a byte."""
        if self._letters is None:
            text = "".join(map(_OP, self.actions)).encode("ascii")
            self._letters = np.frombuffer(text, dtype=np.uint8)
        return self._letters

    def stages(self) -> np.ndarray:
        """Each action's stage."""
        if self._stages is None:
            self._stages = np.fromiter(map(_STAGE, self.actions), dtype=np.intp,
                                       count=len(self.actions))
        return self._stages

    def times(self) -> tuple[np.ndarray, np.ndarray]:
        """Each action's start and end."""
        if self._times is None:
            self._times = (_array(self.starts), _array(self.ends))
        return self._times


def _array(times: Sequence[float] | np.ndarray) -> np.ndarray:
    """``times`` as a float64 array (itself when it is one)."""
    if isinstance(times, np.ndarray):
        return times
    return np.fromiter(times, dtype=np.float64, count=len(times))


def _floats(times: Sequence[float] | np.ndarray) -> Sequence[float]:
    """``times`` as Python floats."""
    return times.tolist() if isinstance(times, np.ndarray) else times


def in_order(rows: list[tuple[Event, ...]], simulated: SimulatedRows) -> tuple[Event, ...]:
    """The events of ``rows`` in the order the simulator produced them."""
    if simulated.runs is not None:
        return tuple(chain.from_iterable(
            rows[rank][first:stop] for rank, first, stop in simulated.runs))
    assert simulated.order is not None, "a simulated timeline has runs or an order"
    flat = list(chain.from_iterable(rows))
    return tuple(map(flat.__getitem__, simulated.order.tolist()))
