"""How a failing rank tells the others, and the errors a pipeline step raises.

A rank that fails posts one line (its rank, its action, the error) to a shared key-value store
(the ``torch.distributed`` store the ranks met through). Every other rank checks that key while
it waits for a tensor, so the whole job stops with the first error instead of waiting out the
timeout. Without a store the others still stop: within the timeout, or at once when the failed
process exits and its connections close.
"""

from __future__ import annotations

import contextlib
import time

import torch.distributed as dist

from stagewise.errors import RuntimeFailure
from stagewise.runtime.engine.heartbeat import relabel

__all__ = ["FailureBoard", "Interrupted", "NonFiniteLoss", "PeerFailure", "StepTimeout"]

_KEY = "stagewise/failure"


class PeerFailure(RuntimeFailure):
    """This rank stopped because another rank failed (or vanished)."""


class StepTimeout(RuntimeFailure):
    """A wait for a tensor from another rank ran past the timeout."""


class NonFiniteLoss(RuntimeFailure):
    """The loss of a micro-batch is NaN or infinite (raised when finite checks are on)."""


class FailureBoard:
    """The shared place where the first failing rank leaves its error.

    Args:
        store: a ``torch.distributed`` store every rank can reach, or None (no board).
        prefix: distinguishes pipelines that share a store.
        poll_interval: seconds between two looks at the store while waiting.
    """

    def __init__(
        self, store: dist.Store | None, prefix: str = "", poll_interval: float = 0.2
    ) -> None:
        self._store = store
        self._key = f"{prefix}{_KEY}"
        self._poll_interval = poll_interval
        self._next_poll = 0.0

    def post(self, text: str) -> None:
        """Leave ``text`` for the others (the first post wins; errors here are ignored). A
        leading pipeline-local ``rank N`` becomes this process's global name (in a mesh,
        ``rank 5 (pp 1, dp 1)``)."""
        if self._store is None:
            return
        # A broken store must not hide the real error.
        with contextlib.suppress(Exception):
            self._store.compare_set(self._key, "", relabel(text))

    def check(self, force: bool = False) -> str | None:
        """The posted failure, or None; looks at the store at most every poll interval."""
        if self._store is None:
            return None
        now = time.monotonic()
        if not force and now < self._next_poll:
            return None
        self._next_poll = now + self._poll_interval
        try:
            if not self._store.check([self._key]):
                return None
            text = self._store.get(self._key).decode()
        except Exception:
            return "the store the ranks share is gone (a rank or the launcher exited)"
        return text or None


class Interrupted(RuntimeFailure):
    """The launcher was asked to stop (``SIGTERM``, ``SIGINT``, ``SIGHUP``); its ranks are
    ended. ``signal``: the signal's number (the CLI exits with 128 + it)."""

    def __init__(self, text: str, signum: int) -> None:
        super().__init__(text)
        self.signal = signum
