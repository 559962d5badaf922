"""Point-to-point transfers of one step: a mailbox that receives ahead, an outbox that sends.

Every tensor travels with a small header (dtype and shape), so a sequence length (or
micro-batch size) that changes from one step to the next just works. Both ends remember the
shape each message had in the previous step (``Shapes``), and the receiver posts the payload
receive for that shape together with the header receive, so the payload can land without
waiting for the receiver to read the header first. Three tags per message:

- ``tag``: the header, whose last field says where the payload comes;
- ``tag + 1``: the payload when its shape is the one both ends remember;
- ``tag + 2``: the payload when the shape is new. If the receiver had posted a receive for a
  remembered shape, the sender fills it with a placeholder of that shape first, so no receive
  is ever left pending.

Receiving: for each peer, a background thread walks the lowered list of messages that peer will
send, in the peer's order, posting and completing each receive and filing the tensor in the
mailbox. Transfers thus run while the main thread computes; the main thread only blocks when it
needs a tensor that has not arrived, and then for at most the timeout, looking at the failure
board while it waits.

Sending: ``isend`` of header and payload; the step waits for the sends at its end (bounded by
the timeout).
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from stagewise.errors import ConfigError
from stagewise.runtime.engine.failure import FailureBoard, PeerFailure, StepTimeout
from stagewise.runtime.engine.lowering import Message

__all__ = ["Mailbox", "Outbox", "Shapes", "decode_header", "encode_header"]

_MAX_DIMS = 8
_HEADER_SIZE = 3 + _MAX_DIMS  # dtype code, ndim, dims..., payload on the remembered tag (0/1)

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
    """The header describing ``tensor``: ``[dtype code, ndim, dim0, ..., 0 ..., remembered]``.

    ``remembered`` says the payload follows on the tag for the shape both ends remember.
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
    return torch.tensor(values, dtype=torch.int64, device=tensor.device)


def decode_header(header: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], bool]:
    """Inverse of :func:`encode_header`: ``(dtype, shape, remembered)``."""
    values = [int(v) for v in header.tolist()]
    return _DTYPES[values[0]], tuple(values[2 : 2 + values[1]]), bool(values[-1])


class Mailbox:
    """Receives one step's incoming tensors ahead of need; see the module docstring.

    Args:
        receives: per peer rank (group rank), the messages it sends here, in its order.
        group: the process group (None: the default group).
        device: where received tensors are put.
        num_stages, num_microbatches: the schedule's sizes (for message tags).
        timeout: seconds any single transfer may take.
        shapes: the shapes received in the previous step; updated as messages arrive.
    """

    def __init__(
        self,
        receives: dict[int, tuple[Message, ...]],
        group: dist.ProcessGroup | None,
        device: torch.device,
        num_stages: int,
        num_microbatches: int,
        timeout: float,
        shapes: Shapes,
    ) -> None:
        self._group = group
        self._shapes = shapes
        self._device = device
        self._sizes = (num_stages, num_microbatches)
        self._timeout = timedelta(seconds=timeout)
        self._ready: dict[tuple[int, int, int], torch.Tensor] = {}
        self._failed: str | None = None
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._receive_all, args=(peer, messages), daemon=True)
            for peer, messages in receives.items()
        ]
        for thread in self._threads:
            thread.start()

    def _receive_all(self, peer: int, messages: tuple[Message, ...]) -> None:
        message = None
        try:
            for message in messages:
                payload = self._receive_one(peer, message)
                with self._cond:
                    self._ready[message.key] = payload
                    self._cond.notify_all()
        except Exception as err:
            assert message is not None
            text = " ".join(str(err).split())[:300]
            with self._cond:
                self._failed = (
                    f"receiving the {message.describe()} from rank {peer} failed: {text}"
                )
                self._cond.notify_all()

    def _receive_one(self, peer: int, message: Message) -> torch.Tensor:
        """Header and payload of one message (see the module docstring for the tags)."""
        tag = message.tag(*self._sizes)
        header = torch.empty(_HEADER_SIZE, dtype=torch.int64, device=self._device)
        header_work = self._post(header, peer, tag)
        expected = self._shapes.get(message.key)
        guess, guess_work = None, None
        if expected is not None:
            guess = torch.empty(expected[1], dtype=expected[0], device=self._device)
            guess_work = self._post(guess, peer, tag + 1)
        header_work.wait(self._timeout)
        dtype, shape, remembered = decode_header(header)
        if guess_work is not None:
            guess_work.wait(self._timeout)  # the payload, or a placeholder when the shape changed
        if remembered:
            assert guess is not None, "sender and receiver disagree on the remembered shape"
            return guess
        payload = torch.empty(shape, dtype=dtype, device=self._device)
        self._post(payload, peer, tag + 2).wait(self._timeout)
        self._shapes[message.key] = (dtype, shape)
        return payload

    def _post(self, tensor: torch.Tensor, peer: int, tag: int) -> dist.Work:
        work = dist.irecv(tensor, group=self._group, group_src=peer, tag=tag)
        assert work is not None
        return work

    def take(
        self, key: tuple[int, int, int], what: str, deadline: float, board: FailureBoard
    ) -> torch.Tensor:
        """Wait (until ``deadline``, a ``time.monotonic()`` value) for the tensor ``key``.

        Raises:
            PeerFailure: another rank posted a failure, or the transfer broke.
            StepTimeout: the deadline passed.
        """
        while True:
            with self._cond:
                if key in self._ready:
                    return self._ready.pop(key)
                if self._failed is not None:
                    raise PeerFailure(self._failed)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StepTimeout(f"waited past the timeout for the {what}")
                self._cond.wait(min(remaining, 0.05))
            posted = board.check()
            if posted is not None:
                raise PeerFailure(f"stopped while waiting for the {what}: {posted}")

    def close(self, deadline: float) -> None:
        """Wait for the receive threads (they are done once every tensor was taken)."""
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class Outbox:
    """Sends tensors without blocking; :meth:`close` waits for them at the end of the step.

    Waiting in the main thread at the end (instead of in a helper thread) keeps the rank at one
    thread besides the receivers, which matters when ranks share few cores.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        num_stages: int,
        num_microbatches: int,
        timeout: float,
        shapes: Shapes,
    ) -> None:
        self._group = group
        self._sizes = (num_stages, num_microbatches)
        self._timeout = timeout
        self._shapes = shapes
        self._pending: list[tuple[dist.Work, Message]] = []

    def send(self, tensor: torch.Tensor, message: Message) -> None:
        """Send ``tensor`` as ``message``: header, then payload (see the module docstring)."""
        payload = tensor.detach().to("cpu").contiguous()  # gloo carries host tensors
        tag = message.tag(*self._sizes)
        now = (payload.dtype, tuple(payload.shape))
        expected = self._shapes.get(message.key)
        remembered = expected == now
        parts = [(encode_header(payload, remembered), tag)]
        if remembered:
            parts.append((payload, tag + 1))
        else:
            if expected is not None:  # fill the receive posted for the remembered shape
                placeholder = torch.zeros(expected[1], dtype=expected[0], device=payload.device)
                parts.append((placeholder, tag + 1))
            parts.append((payload, tag + 2))
            self._shapes[message.key] = now
        for part, part_tag in parts:
            work = dist.isend(part, group=self._group, group_dst=message.dst, tag=part_tag)
            assert work is not None
            self._pending.append((work, message))

    def close(self, deadline: float) -> None:
        """Wait until every send finished; raise if one failed or the deadline passed."""
        for work, message in self._pending:
            remaining = max(0.001, deadline - time.monotonic())
            try:
                work.wait(timedelta(seconds=remaining))
            except Exception as err:
                text = " ".join(str(err).split())[:300]
                where = f"the {message.describe()} to rank {message.dst}"
                raise PeerFailure(f"sending {where} failed: {text}") from None
        self._pending = []
