"""Ranks never outlive their launcher, and a launcher stopped by a signal cleans up.

Three pieces, all used by :func:`~stagewise.runtime.engine.launch.launch`:

- :func:`die_with_parent` (in each rank): on Linux the kernel sends the rank ``SIGKILL`` when
  the launcher exits (``prctl(PR_SET_PDEATHSIG)``); elsewhere a thread polls the parent pid.
- :class:`Reaper`: a tiny process (no torch) beside the ranks that, if the launcher dies
  (even by ``SIGKILL``), kills the ranks still there (a stopped one too) and removes the
  launcher's temporary folder.
- :func:`signals_raise`: ``SIGTERM``, ``SIGINT`` and ``SIGHUP`` raise :class:`Stopped` in the
  launcher, so it ends its ranks and removes its folder instead of dying with them running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

__all__ = ["Reaper", "Stopped", "die_with_parent", "signals_raise"]

_PR_SET_PDEATHSIG = 1
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# The reaper's program: argv = folder, launcher pid. It polls its parent (the launcher); when
# it is gone, it kills the pids listed in folder/pids and removes the folder.
_REAPER = """
import os, shutil, signal, sys, time
folder, launcher = sys.argv[1], int(sys.argv[2])
signal.signal(signal.SIGINT, signal.SIG_IGN)
while os.path.isdir(folder) and os.getppid() == launcher:
    time.sleep(0.2)
if os.path.isdir(folder):
    try:
        pids = [int(p) for p in open(os.path.join(folder, "pids")).read().split()]
    except (OSError, ValueError):
        pids = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.2)
    shutil.rmtree(folder, ignore_errors=True)
"""


class Stopped(Exception):  # noqa: N818 - it says what happened to the launcher
    """The launcher received a signal asking it to stop (``signal``: its number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signal = signum


def die_with_parent(parent: int) -> None:
    """End this process when ``parent`` (the launcher) exits, however it exits."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # gone before the line above: the signal would never come
        os._exit(1)
    if not sys.platform.startswith("linux"):
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.25)
    os._exit(1)


class Reaper:
    """The process that cleans up after a launcher that died without cleaning up.

    Args:
        folder: the launcher's temporary folder (removed if the launcher dies).
    """

    def __init__(self, folder: str) -> None:
        self._folder = Path(folder)
        self._process = subprocess.Popen(
            [sys.executable, "-c", _REAPER, folder, str(os.getpid())],
            stdin=subprocess.DEVNULL, start_new_session=True,  # no terminal Ctrl-C
        )

    def watch(self, pids: Sequence[int | None]) -> None:
        """The ranks' process ids, to kill if the launcher dies."""
        path = self._folder / "pids"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(" ".join(str(pid) for pid in pids if pid is not None))
        temporary.replace(path)

    def stop(self) -> None:
        """The launcher is cleaning up by itself: end the reaper."""
        self._process.kill()
        self._process.wait()


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Inside: ``SIGTERM``, ``SIGINT`` and ``SIGHUP`` raise :class:`Stopped` (main thread
    only; elsewhere nothing changes). The previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Stopped(signum)

    previous = {number: signal.signal(number, handler) for number in _SIGNALS}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)
