"""Start the ranks: local processes on this machine, or whatever ``torchrun`` started.

``launch(fn, num_ranks, args)`` spawns ``num_ranks`` processes that meet through a
``FileStore`` in a temporary directory (no port to pick), run ``fn(context, *args)`` and send
their results back. Every wait is bounded by the step timeout: the process group's collectives
by its timeout, and a rank that stops beating (see ``heartbeat``: frozen, ``SIGSTOP``) is named
by the launcher, which then ends them all. If a rank raises, exits non-zero or is killed, the
others are told (the pipeline's failure board, closed connections) and, after a short grace,
ended; ``launch`` then raises :class:`RuntimeFailure` naming the first error's rank and action.
The ranks die with the launcher (see ``lifeline``), and a launcher stopped by ``SIGTERM`` or
``SIGINT`` ends them and removes its folder.

Under ``torchrun`` the same worker function runs through :func:`torchrun_context`, which joins
the process group torchrun describes in the environment.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stagewise.errors import RuntimeFailure
from stagewise.runtime.engine.failure import FailureBoard, Interrupted, PeerFailure
from stagewise.runtime.engine.heartbeat import (
    Heartbeat,
    Progress,
    SharedProgress,
    StallWatch,
    StoreProgress,
    beat_interval,
    name_this_process,
    rank_names,
    relabel,
)
from stagewise.runtime.engine.lifeline import Reaper, Stopped, die_with_parent, signals_raise
from stagewise.runtime.engine.peerwatch import watch_peers
from stagewise.schedules.ir import Action

__all__ = ["RankContext", "in_torchrun", "launch", "torchrun_context"]

# Seconds a rank may take from its start to its first beat (importing torch on a busy host).
_STARTUP = 120.0


@dataclass
class RankContext:
    """What a worker function gets: who it is and how to reach the others.

    Attributes:
        rank: this process's rank in the default group.
        world_size: number of ranks.
        store: the store the ranks met through (pass it to ``Pipeline(store=...)``).
        local: True when started by :func:`launch`, False under torchrun.
        name: how messages name this rank (``rank 3 (pp 1, dp 1)`` in a mesh).
    """

    rank: int
    world_size: int
    store: dist.Store | None
    local: bool
    name: str = ""
    _progress: Progress | None = None

    def __post_init__(self) -> None:
        self.name = self.name or f"rank {self.rank}"

    def report_action(self, action: Action) -> None:
        """Record the action about to run, so a killed or frozen rank's action can be named."""
        if self._progress is not None:
            self._progress.record(self.rank, action=action)

    def report_phase(self, phase: str | None, step: int | None = None) -> None:
        """Record what this rank does between actions (one of ``heartbeat.PHASES``; None
        keeps it) and the step (0-based) it is in."""
        if self._progress is not None:
            self._progress.record(self.rank, phase=phase, step=step)


def in_torchrun() -> bool:
    """True when this process was started by torchrun (its environment names the group)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def torchrun_context(backend: str = "gloo", timeout: float = 300.0,
                     names: Sequence[str] | None = None) -> RankContext:
    """Join the process group torchrun set up in the environment, beat through its store and
    watch two peers (see ``peerwatch``); ``timeout`` bounds every wait.

    ``names``: how messages name each global rank (default ``rank N``).
    """
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    labels = list(names) if names is not None else rank_names(world)
    name_this_process(labels[rank])
    progress = StoreProgress(store)
    Heartbeat(progress, rank, beat_interval(timeout)).start()
    watch_peers(progress, FailureBoard(store), rank, world, timeout, labels)
    return RankContext(rank, world, store, local=False, name=labels[rank], _progress=progress)


@dataclass(frozen=True)
class _Outcome:
    rank: int
    ok: bool
    value: Any
    peer: bool  # the error was caused by another rank's failure
    when: float


@dataclass(frozen=True)
class _Options:
    """How each rank runs (one picklable object for the spawned process)."""

    backend: str
    threads: int
    step_timeout: float
    names: tuple[str, ...]
    parent: int


def _worker(rank: int, num_ranks: int, folder: str, fn: Callable[..., Any],
            args: tuple[Any, ...], options: _Options, slots: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    die_with_parent(options.parent)
    progress = SharedProgress(slots)
    Heartbeat(progress, rank, beat_interval(options.step_timeout)).start()
    torch.set_num_threads(options.threads)
    name = options.names[rank]
    name_this_process(name)
    store = dist.FileStore(os.path.join(folder, "store"), num_ranks)
    context = RankContext(rank, num_ranks, store, local=True, name=name, _progress=progress)
    try:
        _join(store, rank, num_ranks, options, progress)
        value = fn(context, *args)
        outcome = _Outcome(rank, True, value, False, time.time())
    except BaseException as err:
        text = relabel(str(err), name) if isinstance(err, RuntimeFailure) else (
            _error_text(name, err))
        peer = isinstance(err, PeerFailure) or _lost_peer(text)
        if not peer:
            with contextlib.suppress(Exception):
                store.compare_set("stagewise/failure", "", text)
        _write(folder, _Outcome(rank, False, text, peer, time.time()))
        # Exit at once: closing the sockets wakes any peer still waiting on this rank.
        os._exit(1)
    progress.record(rank, phase="the end")  # beats go on: alive until it exits
    _write(folder, outcome)
    dist.destroy_process_group()
    # Skip interpreter teardown: the result is written, and destroying torch's native state
    # at exit has been seen to abort (SIGABRT) now and then after a clean run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _join(store: dist.Store, rank: int, num_ranks: int, options: _Options,
          progress: SharedProgress) -> None:
    """Wait for every rank (as long as start-up takes), then form the process group with the
    step timeout, which then bounds every collective."""
    progress.record(rank, phase="the rendezvous")
    store.set_timeout(timedelta(seconds=_STARTUP + options.step_timeout))
    store.add("stagewise/arrived", 1)
    while int(store.add("stagewise/arrived", 0)) < num_ranks:
        time.sleep(0.05)
    store.set_timeout(timedelta(seconds=options.step_timeout))
    dist.init_process_group(options.backend, store=store, rank=rank, world_size=num_ranks,
                            timeout=timedelta(seconds=options.step_timeout))
    progress.record(rank, phase="start-up")


def _lost_peer(text: str) -> bool:
    """Whether an error only says another rank went away (its connection closed)."""
    return any(words in text for words in ("Connection closed by peer", "Connection reset by peer",
                                           "Broken pipe"))


def _error_text(name: str, err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return " ".join(f"{name} failed: {type(err).__name__}: {err}{where}".split())


def _write(folder: str, outcome: _Outcome) -> None:
    path = Path(folder, f"rank{outcome.rank}.pkl")
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(pickle.dumps(outcome))
    temporary.replace(path)


def _read(folder: str, rank: int) -> _Outcome | None:
    path = Path(folder, f"rank{rank}.pkl")
    return pickle.loads(path.read_bytes()) if path.exists() else None


def launch(
    fn: Callable[..., Any],
    num_ranks: int,
    args: tuple[Any, ...] = (),
    *,
    timeout: float = 300.0,
    grace: float = 10.0,
    backend: str = "gloo",
    threads: int = 1,
    step_timeout: float | None = None,
    names: Sequence[str] | None = None,
) -> list[Any]:
    """Run ``fn(context, *args)`` on ``num_ranks`` local processes; return their results.

    Args:
        fn: a module-level function (it is pickled by name).
        num_ranks: processes to start.
        args: more arguments for ``fn`` (picklable).
        timeout: seconds the whole run may take (a backstop).
        grace: seconds the other ranks get to stop by themselves after one fails.
        backend: ``"gloo"`` (CPU) or ``"nccl"``.
        threads: ``torch.set_num_threads`` in each rank.
        step_timeout: seconds any one wait may take: the process group's timeout, and the
            silence after which a rank that stopped beating is named and every rank ended
            (default ``timeout``).
        names: how messages name each rank (default ``rank N``; see ``heartbeat.rank_names``).

    Returns:
        ``fn``'s return value of each rank, in rank order.

    Raises:
        RuntimeFailure: a rank raised, exited non-zero, was killed or stopped responding, or
            the run timed out; the message leads with the first error (its rank and action).
        Interrupted: the launcher received ``SIGTERM``, ``SIGINT`` or ``SIGHUP`` (its ranks
            are ended and its folder removed).
    """
    step = timeout if step_timeout is None else step_timeout
    labels = tuple(names) if names is not None else tuple(rank_names(num_ranks))
    options = _Options(backend, threads, step, labels, os.getpid())
    with tempfile.TemporaryDirectory(prefix="stagewise-") as folder:
        context = mp.get_context("spawn")
        progress = SharedProgress.create(context, num_ranks)
        processes = [
            context.Process(target=_worker, daemon=True,
                            args=(rank, num_ranks, folder, fn, args, options, progress.slots))
            for rank in range(num_ranks)
        ]
        watch = StallWatch(range(num_ranks), step, _STARTUP)
        reaper = Reaper(folder)
        try:
            with signals_raise():
                for process in processes:
                    process.start()
                reaper.watch([process.pid for process in processes])
                deaths, ended, stalled = _supervise(processes, timeout, grace, watch, progress)
        except Stopped as stop:
            _end(processes)
            raise Interrupted(
                f"the launcher was stopped by {stop}: ended its {num_ranks} ranks "
                f"({_doing(progress, num_ranks)})", stop.signal) from None
        finally:
            reaper.stop()
        outcomes = [_read(folder, rank) for rank in range(num_ranks)]
        exitcodes = [p.exitcode for p in processes]
        failures = _failures(outcomes, deaths, ended, stalled, progress, exitcodes, timeout,
                             labels, step)
        if failures:
            raise RuntimeFailure("; then ".join(failures[:4]))
        return [outcome.value for outcome in outcomes if outcome is not None]


def _doing(progress: SharedProgress, num_ranks: int) -> str:
    """What each rank was doing, in one phrase (``rank 0 at 0F3 in step 2, ...``)."""
    return ", ".join(f"rank {rank} at {progress.read(rank)[1]}" for rank in range(num_ranks))


def _end(processes: list[Any]) -> set[int]:
    """Kill every live process (a stopped one too) and reap them all; the ranks ended."""
    ended = set()
    for rank, process in enumerate(processes):
        if process.pid is not None and process.is_alive():
            process.kill()
            ended.add(rank)
    for process in processes:
        if process.pid is not None:
            process.join(5)
    return ended


def _supervise(
    processes: list[Any], timeout: float, grace: float, watch: StallWatch,
    progress: SharedProgress,
) -> tuple[dict[int, float], set[int], dict[int, str]]:
    """Wait for every process; end them all after a failure plus ``grace``, once a rank stops
    beating, or at the timeout.

    Returns when each process was seen to exit non-zero, the ranks the launcher ended, and
    the ranks that stopped beating with what they were doing.
    """
    deadline = time.monotonic() + timeout
    stop_at = deadline
    deaths: dict[int, float] = {}
    stalled: dict[int, str] = {}
    while any(p.is_alive() for p in processes):
        now = time.monotonic()
        for rank, process in enumerate(processes):
            if process.exitcode not in (None, 0) and rank not in deaths:
                deaths[rank] = time.time()
                stop_at = min(stop_at, now + grace)
        silent = watch.stalled(progress.read, skip=lambda r: not processes[r].is_alive())
        if silent:
            stalled = dict(silent)
            break
        if now >= stop_at:
            break
        time.sleep(0.02)
    ended = _end(processes)
    for rank, process in enumerate(processes):
        if process.exitcode not in (None, 0):
            deaths.setdefault(rank, time.time())
    return deaths, ended, stalled


def _failures(
    outcomes: list[_Outcome | None],
    deaths: dict[int, float],
    ended: set[int],
    stalled: dict[int, str],
    progress: SharedProgress,
    exitcodes: list[int | None],
    timeout: float,
    names: Sequence[str],
    step_timeout: float,
) -> list[str]:
    """Error lines, the first (a rank that stopped responding, else the earliest error not
    caused by another rank) first."""
    found: list[tuple[int, float, str]] = []
    for rank, outcome in enumerate(outcomes):
        during = progress.last_action(rank)
        name = names[rank]
        if rank in stalled:
            silence = ("it never beat, while the others did" if stalled[rank] == "start-up"
                       else f"no sign of life for {step_timeout:g} s")
            found.append((-1, 0.0, f"{name} stopped responding at {stalled[rank]} ({silence}: "
                          "frozen or stopped); the launcher ended every rank"))
        elif outcome is not None and not outcome.ok:
            found.append((1 if outcome.peer else 0, outcome.when, str(outcome.value)))
        elif outcome is not None and exitcodes[rank] != 0:
            found.append((0, deaths.get(rank, time.time()),
                          f"{name} finished but exited with code {exitcodes[rank]}"))
        elif outcome is None and rank in ended:
            primary = 0 if len(deaths) == len(ended) and not stalled else 2
            found.append(
                (primary, time.time(),
                 f"{name} did not finish within {timeout:g}s{during}; the launcher ended it"
                 if primary == 0 else f"{name} was ended by the launcher{during}")
            )
        elif outcome is None:
            code = exitcodes[rank]
            how = (
                f"was killed by {signal.Signals(-code).name}"
                if code is not None and code < 0
                else f"exited with code {code} without a result"
            )
            found.append((0, deaths.get(rank, time.time()), f"{name} {how}{during}"))
    found.sort(key=lambda item: (item[0], item[1]))
    return [text for _, _, text in found]
