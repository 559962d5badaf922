"""A rank's row built by counting: "the next forward of stage s", "the next I of stage s".

Phase-based generators (ZB-V, DualPipeV) describe a rank's row as a sequence of phases, each
appending the *next* micro-batch of some (stage, op). :class:`RowBuilder` keeps those counters
per rank, so the generators read as their phase lists.
"""

from __future__ import annotations

from collections import deque

from stagewise.schedules.ir import Action, Op

__all__ = ["RowBuilder", "v_placement"]


def v_placement(num_ranks: int) -> tuple[int, ...]:
    """V-shaped placement of 2p stages on p ranks: rank r holds stages r and 2p - 1 - r.

    Example:
        >>> v_placement(3)
        (0, 1, 2, 2, 1, 0)
    """
    return tuple(range(num_ranks)) + tuple(reversed(range(num_ranks)))


class RowBuilder:
    """Appends actions to one rank's row, each with the next micro-batch of its (stage, op).

    Actions for micro-batches ``>= limit`` are counted but not written, so a generator may run
    its phases for a larger virtual m and keep only the real micro-batches (the trick torch's
    ZB-V uses for m < 2p - 1).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.row: list[Action] = []
        self._next: dict[tuple[int, Op], int] = {}
        self._pending_weights: deque[tuple[int, int]] = deque()

    def count(self, stage: int, op: Op) -> int:
        """How many ``op`` actions of ``stage`` were appended so far (written or not)."""
        return self._next.get((stage, op), 0)

    def add(self, stage: int, op: Op) -> None:
        """Append ``op`` on the next micro-batch of ``stage``.

        A B counts as both the I and the W of its micro-batch; an I queues its W for
        :meth:`add_pending_weight`.
        """
        key = Op.I if op is Op.B else op
        j = self.count(stage, key)
        self._next[(stage, key)] = j + 1
        if op is Op.B:
            self._next[(stage, Op.W)] = self.count(stage, Op.W) + 1
        elif op is Op.I:
            self._pending_weights.append((stage, j))
        if j < self.limit:
            self.row.append(Action(stage, op, j))

    def add_pending_weight(self) -> None:
        """Append the oldest W whose I was appended and whose W was not; no-op if none."""
        if not self._pending_weights:
            return
        stage, j = self._pending_weights.popleft()
        self._next[(stage, Op.W)] = self.count(stage, Op.W) + 1
        if j < self.limit:
            self.row.append(Action(stage, Op.W, j))
