"""Under torchrun, the ranks watch each other (there is no stagewise launcher to do it).

Each rank runs one daemon thread that, every beat interval, looks at the failure board and at
the beats of the next two ranks (ring order: every rank is watched twice, and nobody reads
every key of a big world). A peer silent for half of ``stall`` seconds is posted as the run's first
error (``rank 5 (pp 1, dp 1) stopped responding at 1B3 in step 4``) and this rank leaves; a
failure posted by another rank ends this one too after a short grace (in case its main thread
is stuck in a collective and never polls the board). So a frozen rank, or a lost node, stops the
whole torchrun job within about ``stall`` seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence

from stagewise.runtime.engine.failure import FailureBoard
from stagewise.runtime.engine.heartbeat import StallWatch, StoreProgress, beat_interval

__all__ = ["watch_peers"]


def watch_peers(progress: StoreProgress, board: FailureBoard, rank: int, world_size: int,
                stall: float, names: Sequence[str]) -> threading.Thread | None:
    """Start this rank's watcher thread (None in a world of one)."""
    peers = sorted({(rank + k) % world_size for k in (1, 2)} - {rank})
    if not peers:
        return None
    # Half the timeout: the frozen rank is named before its neighbours' own waits time out.
    watch = StallWatch(peers, max(stall / 2, 3 * beat_interval(stall)), startup=stall + 60.0)
    thread = threading.Thread(target=_run, args=(progress, board, watch, stall, names),
                              name="stagewise-peerwatch", daemon=True)
    thread.start()
    return thread


def _run(progress: StoreProgress, board: FailureBoard, watch: StallWatch, stall: float,
         names: Sequence[str]) -> None:
    interval = beat_interval(stall)
    broken_since: float | None = None
    while True:
        time.sleep(interval)
        try:
            posted = board.check(force=True)
            if progress.finishing():
                return  # past the last collective: the others may exit before this rank
            silent = watch.stalled(progress.read, skip=lambda r: _finishing(progress.read(r)[1]))
            broken_since = None
        except Exception:
            broken_since = broken_since or time.monotonic()
            if time.monotonic() - broken_since > stall:
                _leave("the store the ranks share stopped answering (the torchrun agent that "
                       "hosts it is gone?)")
            continue
        if silent:
            peer, what = silent[0]
            text = (f"{names[peer]} stopped responding at {what} (no sign of life for "
                    f"{watch.stall:g} s: frozen, stopped or its node lost)")
            board.post(text)
            _end_if_local(progress, peer)
            _leave(text)
        if posted:
            time.sleep(min(stall, 5.0))  # the main thread normally reports it first
            _leave(posted)


def _end_if_local(progress: StoreProgress, peer: int) -> None:
    """Kill a stopped peer on this host: torchrun's agent would wait 30 s for it to take a
    SIGTERM it cannot take while stopped."""
    host, pid = progress.process(peer)
    if host == socket.gethostname() and pid > 0:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _finishing(what: str) -> bool:
    return what.startswith(("the final gather", "the end"))


def _leave(text: str) -> None:
    print(f"stagewise: training failed: {text}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
