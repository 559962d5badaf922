"""Point-to-point transfers of one step, posted from one thread in one global order.

NCCL matches the transfers between two ranks by their order, not by tags, and runs them on a
stream per communicator: two ranks that post the transfers between them in different orders
deadlock. So every rank posts its transfers in ``RankPlan.order``, the order in which the
producing actions run in a sequential run of the whole schedule (``lowering``). Every pair of
ranks then agrees on which transfer comes next, and the schedule cannot deadlock: a rank only
ever waits for a message produced earlier in that order than anything it still has to post.
All posting happens in the thread that runs the schedule (NCCL must not be called from
several threads on one communicator).

:class:`Wire` keeps a pointer into the order. Receives are posted as soon as every transfer
before them in the order has been posted (ahead of need, so they run while this rank
computes); a send is posted when its tensor exists. Waiting happens only when an action needs
a tensor, and for at most the timeout, looking at the failure board while it waits. gloo
reports a finished transfer only through a blocking wait, so a thread per peer waits for
the gloo transfers (headers, and payloads under gloo) in the order they were posted; it posts
nothing. NCCL payloads are waited for on the compute stream, not the host.

Two groups carry a step (they are the same group under gloo):

- the **data** group carries payloads: the pipeline's own group, so CUDA tensors go straight
  through NCCL without host memory; under gloo, host tensors.
- the **meta** group (always gloo, host memory) carries a small header per message (dtype,
  shape, and whether the payload is on the data group), and the payloads whose shape the
  receiver could not know in advance.

Both ends remember the shape each message had in the previous step (``Shapes``). A receive for
a remembered shape posts its payload buffer on the data group together with its header: the
fast path, every step after the first. A message seen for the first time, or whose shape
changed (another sequence length), travels over the meta group, host-staged; when the shape
changed, the sender fills the receive posted for the remembered shape with a placeholder, so no
receive is left pending and the data group's order stays the same on both ends.

Tags (gloo matches by tag; NCCL ignores them): ``tag`` the header, ``tag + 1`` the payload on
the data group, ``tag + 2`` the payload on the meta group.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from stagewise.errors import ConfigError
from stagewise.runtime.engine.failure import FailureBoard, PeerFailure, StepTimeout
from stagewise.runtime.engine.lowering import Message

__all__ = ["Shapes", "Wire", "decode_header", "encode_header", "warm_up"]

_MAX_DIMS = 8
_HEADER_SIZE = 3 + _MAX_DIMS  # dtype code, ndim, dims..., payload on the data group (0/1)
_CPU = torch.device("cpu")

# (kind, stage, micro-batch) -> (dtype, shape) of that message in the previous step.
Shapes = dict[tuple[int, int, int], tuple[torch.dtype, tuple[int, ...]]]
_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)


def encode_header(tensor: torch.Tensor, remembered: bool = False) -> torch.Tensor:
    """The header describing ``tensor`` (a host tensor):
    ``[dtype code, ndim, dim0, ..., 0 ..., remembered]``.

    ``remembered`` says the payload follows on the data group, in the remembered shape.
    """
    if tensor.dtype not in _DTYPES:
        raise ConfigError(
            f"cannot send a {tensor.dtype} tensor between stages: use one of "
            f"{', '.join(str(d) for d in _DTYPES)}"
        )
    if tensor.dim() > _MAX_DIMS:
        raise ConfigError(
            f"a stage output has {tensor.dim()} dimensions; at most {_MAX_DIMS} can be sent: "
            "reshape it inside the stage"
        )
    values = [_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape]
    values += [0] * (_HEADER_SIZE - 1 - len(values))
    values.append(int(remembered))
    return torch.tensor(values, dtype=torch.int64)


def decode_header(header: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], bool]:
    """Inverse of :func:`encode_header`: ``(dtype, shape, remembered)``."""
    values = [int(v) for v in header.tolist()]
    return _DTYPES[values[0]], tuple(values[2 : 2 + values[1]]), bool(values[-1])


@dataclass(frozen=True)
class Groups:
    """The process groups a pipeline's transfers use (see the module docstring).

    Attributes:
        data: carries payloads; its backend decides where they live (``wire``).
        meta: a gloo group over the same ranks, in the same order: headers, new shapes.
        wire: the device payloads travel from: the stages' device under NCCL, else the host.
        native: True when the data group moves device tensors itself (NCCL), so waiting for a
            payload is a stream dependency, not a host wait.
    """

    data: dist.ProcessGroup | None
    meta: dist.ProcessGroup | None
    wire: torch.device
    native: bool


@dataclass
class _Receive:
    """A posted receive: its header and, for a remembered shape, its payload buffer."""

    message: Message
    header: torch.Tensor
    buffer: torch.Tensor | None
    buffer_work: dist.Work | None


class _Waiter:
    """Waits, in a thread, for the gloo transfers coming from one peer, in posting order.

    gloo's ``Work`` reports completion only through a blocking ``wait`` (``is_completed``
    stays False until then, and a timed-out wait breaks the connection), so a thread per
    peer does the waiting while the main thread computes. The thread only waits; every
    transfer is posted by the main thread, in the global order. From one peer, messages
    arrive in the order it sends them, which is the order they are posted here, so waiting
    in that order never waits behind something that is not yet on its way.
    """

    def __init__(self, peer: int, timeout: float, done: threading.Condition,
                 arrived: set[tuple[int, int, int]], errors: list[str]) -> None:
        self._peer = peer
        self._timeout = timedelta(seconds=timeout)
        self._done = done
        self._arrived = arrived
        self._errors = errors
        self._queue: queue.SimpleQueue[tuple[Message, list[dist.Work]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, message: Message, works: list[dist.Work]) -> None:
        self._queue.put((message, works))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            message, works = item
            try:
                for work in works:
                    work.wait(self._timeout)
            except Exception as err:
                text = " ".join(str(err).split())[:300]
                with self._done:
                    self._errors.append(f"receiving the {message.describe()} from rank "
                                        f"{self._peer} failed: {text}")
                    self._done.notify_all()
                return
            with self._done:
                self._arrived.add(message.key)
                self._done.notify_all()

    def close(self, deadline: float) -> None:
        self._queue.put(None)
        self._thread.join(max(0.0, deadline - time.monotonic()))


class Wire:
    """One step's transfers on one rank; see the module docstring.

    Args:
        order: every message this rank sends or receives, in the global order.
        rank: this rank (group rank).
        groups: the data and meta groups.
        sizes: ``(num_stages, num_microbatches)`` of the schedule (for the tags).
        timeout: seconds any single transfer may take.
        sent, received: the shapes of the previous step, as sent and as received; updated.
        board: where a failing rank leaves its error (checked while waiting).
    """

    def __init__(
        self,
        order: tuple[Message, ...],
        rank: int,
        groups: Groups,
        sizes: tuple[int, int],
        timeout: float,
        sent: Shapes,
        received: Shapes,
        board: FailureBoard,
    ) -> None:
        self._order = order
        self._rank = rank
        self._groups = groups
        self._sizes = sizes
        self._timeout = timeout
        self._sent = sent
        self._received = received
        self._board = board
        self._next = 0  # index in ``order`` of the next transfer to post
        self._ready: dict[tuple[int, int, int], torch.Tensor] = {}
        self._receiving: dict[tuple[int, int, int], _Receive] = {}
        self._sending: list[tuple[dist.Work, Message]] = []
        self._done = threading.Condition()
        self._arrived: set[tuple[int, int, int]] = set()
        self._errors: list[str] = []
        self._waiters: dict[int, _Waiter] = {}

    # --- posting, in the global order ------------------------------------------------------

    def send(self, tensor: torch.Tensor, message: Message) -> None:
        """Hand over ``tensor`` as ``message``; it is posted once its turn in the order comes."""
        self._ready[message.key] = tensor.detach()
        self._post_in_order()

    def _post_in_order(self) -> None:
        while self._next < len(self._order):
            message = self._order[self._next]
            if message.src == self._rank:
                tensor = self._ready.pop(message.key, None)
                if tensor is None:
                    return  # not computed yet: everything after it waits its turn
                self._post_send(tensor, message)
            else:
                self._post_receive(message)
            self._next += 1

    def _post_send(self, tensor: torch.Tensor, message: Message) -> None:
        tag = message.tag(*self._sizes)
        groups = self._groups
        payload = tensor.to(groups.wire).contiguous()
        now = (payload.dtype, tuple(payload.shape))
        expected = self._sent.get(message.key)
        remembered = expected == now
        self._isend(groups.meta, encode_header(payload, remembered), message, tag)
        if remembered:
            self._isend(groups.data, payload, message, tag + 1)
            return
        if expected is not None:  # fill the receive posted for the remembered shape
            placeholder = torch.zeros(expected[1], dtype=expected[0], device=groups.wire)
            self._isend(groups.data, placeholder, message, tag + 1)
        self._isend(groups.meta, payload.to(_CPU), message, tag + 2)
        self._sent[message.key] = now

    def _isend(
        self, group: dist.ProcessGroup | None, tensor: torch.Tensor, message: Message, tag: int
    ) -> None:
        work = dist.isend(tensor, group=group, group_dst=message.dst, tag=tag)
        assert work is not None
        self._sending.append((work, message))

    def _post_receive(self, message: Message) -> None:
        tag = message.tag(*self._sizes)
        groups = self._groups
        header = torch.empty(_HEADER_SIZE, dtype=torch.int64)
        works = [_irecv(groups.meta, header, message.src, tag)]
        buffer, buffer_work = None, None
        expected = self._received.get(message.key)
        if expected is not None:
            buffer = torch.empty(expected[1], dtype=expected[0], device=groups.wire)
            buffer_work = _irecv(groups.data, buffer, message.src, tag + 1)
            if not groups.native:
                works.append(buffer_work)
        self._receiving[message.key] = _Receive(message, header, buffer, buffer_work)
        if message.src not in self._waiters:
            self._waiters[message.src] = _Waiter(message.src, self._timeout, self._done,
                                                 self._arrived, self._errors)
        self._waiters[message.src].add(message, works)

    # --- waiting ---------------------------------------------------------------------------

    def take(self, key: tuple[int, int, int], what: str, deadline: float) -> torch.Tensor:
        """The tensor ``key`` (on the wire device), waiting until ``deadline`` (a
        ``time.monotonic()`` value).

        Raises:
            PeerFailure: another rank posted a failure, or the transfer broke.
            StepTimeout: the deadline passed.
        """
        self._post_in_order()
        receive = self._receiving.pop(key, None)
        assert receive is not None, f"the {what} is not posted: the transfer order is stuck"
        self._wait_arrival(key, what, deadline)
        dtype, shape, remembered = decode_header(receive.header)
        if receive.buffer_work is not None and self._groups.native:
            receive.buffer_work.wait()  # the compute stream waits for NCCL; the host does not
        if remembered:
            assert receive.buffer is not None, "sender and receiver disagree on the shape"
            return receive.buffer
        # A new shape: the sender posted the payload on the meta group right after the
        # header that has arrived, so this wait is for a transfer already under way.
        payload = torch.empty(shape, dtype=dtype)
        tag = receive.message.tag(*self._sizes) + 2
        try:
            _irecv(self._groups.meta, payload, receive.message.src, tag).wait(
                timedelta(seconds=max(0.001, deadline - time.monotonic())))
        except Exception as err:
            text = " ".join(str(err).split())[:300]
            raise PeerFailure(f"receiving the {what} failed: {text}") from None
        self._received[key] = (dtype, shape)
        return payload.to(self._groups.wire)

    def _wait_arrival(self, key: tuple[int, int, int], what: str, deadline: float) -> None:
        """Block until the waiter threads saw ``key`` arrive, watching the failure board."""
        while True:
            with self._done:
                if key in self._arrived:
                    self._arrived.discard(key)
                    return
                if self._errors:
                    raise PeerFailure(self._errors[0])
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StepTimeout(f"waited past the timeout for the {what}")
                self._done.wait(min(remaining, 0.05))
            posted = self._board.check()
            if posted is not None:
                raise PeerFailure(f"stopped while waiting for the {what}: {posted}")

    def close(self, deadline: float) -> None:
        """Wait until every send finished; raise if one failed or the deadline passed."""
        self._post_in_order()
        assert self._next == len(self._order), "the step ended with transfers not posted"
        assert not self._receiving, "the step ended with received tensors nobody took"
        for work, message in self._sending:
            try:
                work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
            except Exception as err:
                text = " ".join(str(err).split())[:300]
                where = f"the {message.describe()} to rank {message.dst}"
                raise PeerFailure(f"sending {where} failed: {text}") from None
        self._sending = []
        for waiter in self._waiters.values():
            waiter.close(deadline)


def _irecv(group: dist.ProcessGroup | None, tensor: torch.Tensor, src: int, tag: int) -> dist.Work:
    work = dist.irecv(tensor, group=group, group_src=src, tag=tag)
    assert work is not None
    return work


def warm_up(pairs: list[tuple[int, int]], rank: int, groups: Groups) -> None:
    """One tiny exchange over the data group with each neighbour, pair by pair in one order
    on every rank, so NCCL sets up its connections before the first step (not inside it).
    A no-op unless the data group is native (NCCL).
    """
    if not groups.native:
        return
    for low, high in sorted(pairs):
        if rank not in (low, high):
            continue
        peer = high if rank == low else low
        out = torch.zeros(1, device=groups.wire)
        into = torch.empty(1, device=groups.wire)
        ops = [dist.P2POp(dist.isend, out, group=groups.data, group_peer=peer),
               dist.P2POp(dist.irecv, into, group=groups.data, group_peer=peer)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
