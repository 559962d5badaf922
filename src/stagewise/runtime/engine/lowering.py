"""Lower a compute-only schedule to the messages each rank sends and receives.

Communication is not written in a schedule; it follows from the placement. The forward of
stage s sends its activation to stage s+1 when that stage lives on another rank; the backward
(B or I) of stage s sends the input gradient to stage s-1 likewise. Stages on the same rank hand
tensors over locally. A rank receives, from each peer, exactly that peer's sends to it, in the
order the peer's row makes them, so receives can be posted ahead in the right order.

``RankPlan.order`` puts every message a rank takes part in (sent or received) in one global
order, the order in which the producing actions run in ``execution_order`` (a sequential run of
the whole schedule). Every rank posts its transfers in that order, so two ranks never disagree
on which transfer between them comes next: the property NCCL needs, which matches transfers
between two ranks by their order, not by tags (see ``p2p``).

Pure Python (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from stagewise.schedules.ir import Action, Op, Schedule
from stagewise.schedules.validate import execution_order

__all__ = ["Kind", "Message", "RankPlan", "lower"]


class Kind(IntEnum):
    """What a message carries."""

    ACTIVATION = 0  # output of stage s, input of stage s+1
    GRADIENT = 1  # gradient of stage s's input, for stage s-1


@dataclass(frozen=True)
class Message:
    """One point-to-point transfer of one micro-batch.

    Attributes:
        kind: activation or gradient.
        stage: the stage that produces it.
        microbatch: the micro-batch it belongs to.
        src: the sending rank.
        dst: the receiving rank.
    """

    kind: Kind
    stage: int
    microbatch: int
    src: int
    dst: int

    @property
    def key(self) -> tuple[Kind, int, int]:
        """``(kind, stage, microbatch)``: what the consumer looks the tensor up by."""
        return (self.kind, self.stage, self.microbatch)

    def tag(self, num_stages: int, num_microbatches: int) -> int:
        """A multiple of 4 unique within one step; ``p2p`` uses it and the next 2 tags.

        Every tag of a step is below ``8 * num_stages * num_microbatches``.
        """
        index = (int(self.kind) * num_stages + self.stage) * num_microbatches + self.microbatch
        return 4 * index

    def describe(self) -> str:
        what = "activation" if self.kind is Kind.ACTIVATION else "gradient"
        return f"{what} of stage {self.stage}, micro-batch {self.microbatch}"


@dataclass(frozen=True)
class RankPlan:
    """What one rank sends after each of its actions and receives from each peer.

    Attributes:
        rank: the rank this plan is for.
        sends: ``sends[i]`` is the message sent after the i-th action of the rank's row, or
            None when that action's result stays on this rank (or goes nowhere).
        receives: ``receives[peer]`` lists the messages coming from ``peer``, in the order
            ``peer`` sends them.
        order: every message this rank sends or receives, in the schedule's global order
            (the order the producing actions run in ``execution_order``). For any two ranks,
            the messages between them come in the same order in both ranks' ``order``.
    """

    rank: int
    sends: tuple[Message | None, ...]
    receives: dict[int, tuple[Message, ...]]
    order: tuple[Message, ...] = ()


def _outgoing(schedule: Schedule, rank: int, action: Action) -> Message | None:
    """The message ``action`` (run on ``rank``) sends, if its consumer lives elsewhere."""
    stage, j = action.stage, action.microbatch
    if action.op is Op.F and stage + 1 < schedule.num_stages:
        dst = schedule.rank_of(stage + 1)
        kind = Kind.ACTIVATION
    elif action.op.is_backward and stage > 0:
        dst = schedule.rank_of(stage - 1)
        kind = Kind.GRADIENT
    else:
        return None
    if dst == rank:
        return None
    return Message(kind, stage, j, rank, dst)


def lower(schedule: Schedule, rank: int) -> RankPlan:
    """The messages ``rank`` sends and receives when it runs ``schedule``.

    Example:
        >>> from stagewise.schedules import build
        >>> plan = lower(build("gpipe", num_ranks=2, num_microbatches=2), 0)
        >>> [m.describe() for m in plan.receives[1]]
        ['gradient of stage 1, micro-batch 0', 'gradient of stage 1, micro-batch 1']
    """
    sends = tuple(_outgoing(schedule, rank, a) for a in schedule.actions[rank])
    receives: dict[int, tuple[Message, ...]] = {}
    for peer in range(schedule.num_ranks):
        if peer == rank:
            continue
        incoming = []
        for action in schedule.actions[peer]:
            message = _outgoing(schedule, peer, action)
            if message is not None and message.dst == rank:
                incoming.append(message)
        if incoming:
            receives[peer] = tuple(incoming)
    order = []
    for producer, action in execution_order(schedule):
        message = _outgoing(schedule, producer, action)
        if message is not None and rank in (message.src, message.dst):
            order.append(message)
    return RankPlan(rank=rank, sends=sends, receives=receives, order=tuple(order))
