"""Start the ranks: local processes on this machine, or whatever ``torchrun`` started.

``launch(fn, num_ranks, args)`` spawns ``num_ranks`` processes that meet through a
``FileStore`` in a temporary directory (no port to pick), run ``fn(context, *args)`` and send
their results back. If a rank raises, exits non-zero or is killed, the others are told (the
pipeline's failure board, closed connections) and, after a short grace, ended; ``launch`` then
raises :class:`RuntimeFailure` naming the first error's rank and action.

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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stagewise.errors import RuntimeFailure
from stagewise.runtime.engine.failure import PeerFailure
from stagewise.schedules.ir import Action

__all__ = ["RankContext", "in_torchrun", "launch", "torchrun_context"]


@dataclass
class RankContext:
    """What a worker function gets: who it is and how to reach the others.

    Attributes:
        rank: this process's rank in the default group.
        world_size: number of ranks.
        store: the store the ranks met through (pass it to ``Pipeline(store=...)``).
        local: True when started by :func:`launch`, False under torchrun.
    """

    rank: int
    world_size: int
    store: dist.Store | None
    local: bool
    _progress: Any = None

    def report_action(self, action: Action) -> None:
        """Record the action about to run, so a killed rank's last action can be named."""
        if self._progress is not None:
            base = 3 * self.rank
            self._progress[base : base + 3] = [action.stage, "FBIW".index(action.op.value),
                                               action.microbatch]


def in_torchrun() -> bool:
    """True when this process was started by torchrun (its environment names the group)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def torchrun_context(backend: str = "gloo", timeout: float = 300.0) -> RankContext:
    """Join the process group torchrun set up in the environment."""
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    store = dist.distributed_c10d._get_default_store()
    return RankContext(dist.get_rank(), dist.get_world_size(), store, local=False)


@dataclass(frozen=True)
class _Outcome:
    rank: int
    ok: bool
    value: Any
    peer: bool  # the error was caused by another rank's failure
    when: float


def _worker(
    rank: int,
    num_ranks: int,
    folder: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    backend: str,
    threads: int,
    timeout: float,
    progress: Any,
) -> None:
    torch.set_num_threads(threads)
    store = dist.FileStore(os.path.join(folder, "store"), num_ranks)
    context = RankContext(rank, num_ranks, store, local=True, _progress=progress)
    try:
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=num_ranks,
            timeout=timedelta(seconds=timeout),
        )
        value = fn(context, *args)
        outcome = _Outcome(rank, True, value, False, time.time())
    except BaseException as err:
        text = str(err) if isinstance(err, RuntimeFailure) else _error_text(rank, err)
        peer = isinstance(err, PeerFailure)
        if not peer:
            with contextlib.suppress(Exception):
                store.compare_set("stagewise/failure", "", text)
        _write(folder, _Outcome(rank, False, text, peer, time.time()))
        # Exit at once: closing the sockets wakes any peer still waiting on this rank.
        os._exit(1)
    _write(folder, outcome)
    dist.destroy_process_group()
    # Skip interpreter teardown: the result is written, and destroying torch's native state
    # at exit has been seen to abort (SIGABRT) now and then after a clean run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _error_text(rank: int, err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return " ".join(f"rank {rank} failed: {type(err).__name__}: {err}{where}".split())


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
) -> list[Any]:
    """Run ``fn(context, *args)`` on ``num_ranks`` local processes; return their results.

    Args:
        fn: a module-level function (it is pickled by name).
        num_ranks: processes to start.
        args: more arguments for ``fn`` (picklable).
        timeout: seconds the whole run may take; also the process group's timeout.
        grace: seconds the other ranks get to stop by themselves after one fails.
        backend: ``"gloo"`` (CPU) or ``"nccl"``.
        threads: ``torch.set_num_threads`` in each rank.

    Returns:
        ``fn``'s return value of each rank, in rank order.

    Raises:
        RuntimeFailure: a rank raised, exited non-zero or was killed, or the run timed out;
            the message leads with the first error (its rank and action).
    """
    with tempfile.TemporaryDirectory(prefix="stagewise-") as folder:
        context = mp.get_context("spawn")
        progress = context.Array("i", [-1] * (3 * num_ranks), lock=False)
        processes = [
            context.Process(
                target=_worker,
                args=(rank, num_ranks, folder, fn, args, backend, threads, timeout, progress),
                daemon=True,
            )
            for rank in range(num_ranks)
        ]
        for process in processes:
            process.start()
        deaths, ended = _supervise(processes, timeout, grace)
        outcomes = [_read(folder, rank) for rank in range(num_ranks)]
        exitcodes = [p.exitcode for p in processes]
        failures = _failures(outcomes, deaths, ended, progress, exitcodes, timeout)
        if failures:
            raise RuntimeFailure("; then ".join(failures[:4]))
        return [outcome.value for outcome in outcomes if outcome is not None]


def _supervise(
    processes: list[Any], timeout: float, grace: float
) -> tuple[dict[int, float], set[int]]:
    """Wait for every process; end them all after a failure plus ``grace``, or the timeout.

    Returns when each process was seen to exit non-zero, and the ranks the launcher ended.
    """
    deadline = time.monotonic() + timeout
    stop_at = deadline
    deaths: dict[int, float] = {}
    while any(p.is_alive() for p in processes):
        now = time.monotonic()
        for rank, process in enumerate(processes):
            if process.exitcode not in (None, 0) and rank not in deaths:
                deaths[rank] = time.time()
                stop_at = min(stop_at, now + grace)
        if now >= stop_at:
            break
        time.sleep(0.02)
    ended = set()
    for rank, process in enumerate(processes):
        if process.is_alive():
            process.kill()
            ended.add(rank)
    for process in processes:
        process.join(5)
    for rank, process in enumerate(processes):
        if process.exitcode not in (None, 0):
            deaths.setdefault(rank, time.time())
    return deaths, ended


def _failures(
    outcomes: list[_Outcome | None],
    deaths: dict[int, float],
    ended: set[int],
    progress: Any,
    exitcodes: list[int | None],
    timeout: float,
) -> list[str]:
    """Error lines, the first (earliest, not caused by another rank) first."""
    found: list[tuple[int, float, str]] = []
    for rank, outcome in enumerate(outcomes):
        during = _last_action(progress, rank)
        if outcome is not None and not outcome.ok:
            found.append((1 if outcome.peer else 0, outcome.when, str(outcome.value)))
        elif outcome is not None and exitcodes[rank] != 0:
            found.append((0, deaths.get(rank, time.time()),
                          f"rank {rank} finished but exited with code {exitcodes[rank]}"))
        elif outcome is None and rank in ended:
            primary = 0 if len(deaths) == len(ended) else 2  # only stragglers: a timeout
            found.append(
                (primary, time.time(),
                 f"rank {rank} did not finish within {timeout:g}s{during}; the launcher ended it"
                 if primary == 0 else f"rank {rank} was ended by the launcher{during}")
            )
        elif outcome is None:
            code = exitcodes[rank]
            how = (
                f"was killed by {signal.Signals(-code).name}"
                if code is not None and code < 0
                else f"exited with code {code} without a result"
            )
            found.append((0, deaths.get(rank, time.time()), f"rank {rank} {how}{during}"))
    found.sort(key=lambda item: (item[0], item[1]))
    return [text for _, _, text in found]


def _last_action(progress: Any, rank: int) -> str:
    stage, op, microbatch = progress[3 * rank : 3 * rank + 3]
    return "" if stage < 0 else f" (last action {stage}{'FBIW'[op]}{microbatch})"
