"""Signs of life: each rank beats, and a rank that stops beating is named.

A frozen rank (``SIGSTOP``, a hung driver, a swapped-out host) never raises, so nothing tells
the others: they wait in a receive or a collective until a timeout names *them*. Instead every
rank runs a :class:`Heartbeat` thread that, every ``interval`` seconds, bumps a counter beside
what the rank is doing (``3B5`` in step 6, the checkpoint save after step 6...). A thread keeps
beating while its rank waits or computes (torch releases the GIL); only a stopped process stops
beating. A watcher (:class:`StallWatch`: the local launcher, or a peer rank under torchrun)
that sees a counter unchanged for ``stall`` seconds names that rank first:
``rank 3 (pp 1, dp 0) stopped responding at 3B5 in step 6``.

Two places hold the beats: :class:`SharedProgress` (shared memory between the local launcher
and its ranks: no lock, so a rank stopped at any instant blocks nobody) and
:class:`StoreProgress` (the ``torch.distributed`` store, for torchrun).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from stagewise.schedules.ir import Action

__all__ = [
    "PHASES",
    "Heartbeat",
    "Progress",
    "SharedProgress",
    "StallWatch",
    "StoreProgress",
    "beat_interval",
    "rank_names",
    "relabel",
]

# What a rank can be doing besides an action of the schedule (an action is phase 0).
PHASES = ("an action", "start-up", "the rendezvous", "the checkpoint load", "the checkpoint save",
          "the optimizer step", "the evaluation", "the final gather", "the end")
_SLOTS = 6  # per rank: stage, op, micro-batch, step, phase, beat counter
_NAME_ENV = "STAGEWISE_RANK_NAME"


def beat_interval(stall: float) -> float:
    """Seconds between two beats for a watcher that declares a rank stopped after ``stall``."""
    return max(0.05, min(1.0, stall / 10))


def rank_names(pp: int, dp: int = 1, tp: int = 1) -> list[str]:
    """Every global rank's name in a mesh laid out (dp, pp, tp), tp innermost.

    A plain pipeline's ranks are ``rank 2``; in a mesh the coordinates follow:
    ``rank 3 (pp 1, dp 1)`` (and ``tp`` when tp > 1).

    Example:
        >>> rank_names(2, dp=2)[3]
        'rank 3 (pp 1, dp 1)'
    """
    if dp == 1 and tp == 1:
        return [f"rank {rank}" for rank in range(pp)]
    names = []
    for rank in range(pp * dp * tp):
        where = f"pp {(rank // tp) % pp}, dp {rank // (pp * tp)}"
        names.append(f"rank {rank} ({where}{f', tp {rank % tp}' if tp > 1 else ''})")
    return names


def relabel(text: str, name: str | None = None) -> str:
    """``text`` with a leading ``rank N`` (a pipeline-local rank) replaced by this rank's name
    (``name``, or the one the launcher put in the environment)."""
    name = name or os.environ.get(_NAME_ENV)
    if not name or text.startswith(name):
        return text
    return re.sub(r"^rank \d+\b", name, text, count=1)


def name_this_process(name: str) -> None:
    """Record this rank's name for :func:`relabel` (the failure board uses it)."""
    os.environ[_NAME_ENV] = name


class Progress(Protocol):
    """Where ranks record what they do and beat, and where watchers read it."""

    def record(self, rank: int, *, action: Action | None = None, phase: str | None = None,
               step: int | None = None) -> None: ...

    def beat(self, rank: int) -> None: ...

    def read(self, rank: int) -> tuple[int, str]: ...


def _describe(stage: int, op: int, microbatch: int, step: int, phase: int) -> str:
    what = f"{stage}{'FBIW'[op]}{microbatch}" if phase == 0 and stage >= 0 else PHASES[phase]
    if phase == 0 and stage < 0:
        what = "start-up"
    return what if step < 0 else f"{what} in step {step + 1}"


@dataclass
class SharedProgress:
    """Beats in shared memory: ``slots`` is a lock-free ``multiprocessing`` array of
    ``6 * num_ranks`` integers (:meth:`create`), written by each rank in its own slots."""

    slots: Any

    @classmethod
    def create(cls, context: Any, num_ranks: int) -> SharedProgress:
        """A fresh one for ``num_ranks`` ranks (``context``: a multiprocessing context)."""
        initial = [-1, 0, 0, -1, PHASES.index("start-up"), 0] * num_ranks
        return cls(context.Array("q", initial, lock=False))

    def record(self, rank: int, *, action: Action | None = None, phase: str | None = None,
               step: int | None = None) -> None:
        """Note what ``rank`` does now: an action of the schedule, a phase, the step."""
        base = _SLOTS * rank
        if action is not None:
            self.slots[base:base + 3] = [action.stage, "FBIW".index(action.op.value),
                                         action.microbatch]
            self.slots[base + 4] = 0
        if phase is not None:
            self.slots[base + 4] = PHASES.index(phase)
        if step is not None:
            self.slots[base + 3] = step

    def beat(self, rank: int) -> None:
        """One sign of life from ``rank``."""
        self.slots[_SLOTS * rank + 5] += 1

    def read(self, rank: int) -> tuple[int, str]:
        """``rank``'s beat counter and what it was doing (``3B5 in step 6``)."""
        stage, op, microbatch, step, phase, count = self.slots[_SLOTS * rank:_SLOTS * rank + 6]
        return count, _describe(stage, op, microbatch, step, phase)

    def last_action(self, rank: int) -> str:
        """`` (last action 1F1)``, or "" before the first action."""
        stage, op, microbatch = self.slots[_SLOTS * rank:_SLOTS * rank + 3]
        return "" if stage < 0 else f" (last action {stage}{'FBIW'[op]}{microbatch})"


@dataclass
class StoreProgress:
    """Beats through a ``torch.distributed`` store (torchrun): each beat writes
    ``stagewise/beat/<rank>`` = ``<count> <host> <pid> <what>``; the rest stays in this
    process."""

    store: Any
    _state: list[int] = field(default_factory=lambda: [-1, 0, 0, -1, 1, 0])

    def record(self, rank: int, *, action: Action | None = None, phase: str | None = None,
               step: int | None = None) -> None:
        """Note what this rank does now (published with the next beat)."""
        if action is not None:
            self._state[0:3] = [action.stage, "FBIW".index(action.op.value), action.microbatch]
            self._state[4] = 0
        if phase is not None:
            self._state[4] = PHASES.index(phase)
        if step is not None:
            self._state[3] = step

    def beat(self, rank: int) -> None:
        """Publish one beat (a store that fails is ignored here: the watcher notices)."""
        self._state[5] += 1
        what = _describe(*self._state[:5])
        text = f"{self._state[5]} {socket.gethostname()} {os.getpid()} {what}"
        with contextlib.suppress(Exception):
            self.store.set(f"stagewise/beat/{rank}", text)

    def finishing(self) -> bool:
        """Whether this rank reached the final gather (or the end)."""
        return self._state[4] >= PHASES.index("the final gather")

    def read(self, rank: int) -> tuple[int, str]:
        """``rank``'s last published beat count and what it was doing (0, "" before any)."""
        count, _, _, what = self._fields(rank)
        return count, what

    def process(self, rank: int) -> tuple[str, int]:
        """The host and pid of ``rank``'s last beat (``("", 0)`` before any)."""
        _, host, pid, _ = self._fields(rank)
        return host, pid

    def _fields(self, rank: int) -> tuple[int, str, int, str]:
        key = f"stagewise/beat/{rank}"
        if not self.store.check([key]):
            return 0, "", 0, "start-up"
        count, host, pid, what = self.store.get(key).decode().split(" ", 3)
        return int(count), host, int(pid), what


class Heartbeat:
    """A daemon thread beating for ``rank`` every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, progress: Progress, rank: int, interval: float) -> None:
        self._progress = progress
        self._rank = rank
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stagewise-heartbeat",
                                        daemon=True)

    def start(self) -> Heartbeat:
        """Start beating (the first beat at once); returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating (a finished rank: watchers must not take it for a stopped one)."""
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._progress.beat(self._rank)
            self._stopped.wait(self._interval)


@dataclass
class StallWatch:
    """Which ranks stopped beating: each beat counter's last change, on the watcher's clock.

    Args:
        ranks: the ranks watched.
        stall: seconds without a new beat after which a rank counts as stopped.
        startup: seconds a rank may take to beat for the first time (``stall`` + 30 s after
            another rank's first beat, if that comes sooner).
    """

    ranks: Sequence[int]
    stall: float
    startup: float
    _seen: dict[int, tuple[int, float]] = field(default_factory=dict)
    _since: float = field(default_factory=time.monotonic)
    _first_beat: float | None = None  # when any watched rank beat first

    def stalled(self, read: Callable[[int], tuple[int, str]],
                skip: Callable[[int], bool] = lambda rank: False) -> list[tuple[int, str]]:
        """``(rank, what it was doing)`` for every watched rank silent too long, oldest
        silence first; ranks for which ``skip`` is true (exited, finished) are not judged."""
        now = time.monotonic()
        found: list[tuple[float, int, str]] = []
        for rank in self.ranks:
            if skip(rank):
                continue
            count, what = read(rank)
            if count and self._first_beat is None:
                self._first_beat = now
            last = self._seen.get(rank)
            if last is None or count != last[0]:
                self._seen[rank] = (count, now)
                continue
            silent_since = last[1] if count else self._since
            if now - silent_since >= (self.stall if count else self._startup_limit()):
                found.append((silent_since, rank, what))
        return [(rank, what) for _, rank, what in sorted(found)]

    def _startup_limit(self) -> float:
        """Seconds a rank may go without its first beat: ``startup``, or less once another
        rank beats (ranks start together: ``stall`` + 30 s after the first one's first beat)."""
        if self._first_beat is None:
            return self.startup
        return min(self.startup, self._first_beat - self._since + self.stall + 30.0)
