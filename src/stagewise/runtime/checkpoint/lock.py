"""One run per checkpoint folder: ``LOCK`` (host, pid, run id) refuses a second one.

Two runs on one ``--checkpoint-dir`` would overwrite each other's checkpoints, and a resume
would mix them. The launcher takes the lock before any rank starts (creating the file is
atomic: of two runs started at once, one wins) and removes it when the run ends. A lock left
by a process that is gone (same host, dead pid: a killed launcher) is taken over, with a
message; a live one, or one from another host (its pid cannot be checked), is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from stagewise.errors import ConfigError

__all__ = ["LOCK", "checkpoint_lock"]

LOCK = "LOCK"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _create(path: Path, entry: dict[str, object]) -> bool:
    """Create the lock file holding ``entry``; False when it exists already."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as file:
        json.dump(entry, file)
    return True


def _holder(path: Path) -> dict[str, object]:
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entry if isinstance(entry, dict) else {}


@contextlib.contextmanager
def checkpoint_lock(folder: str | os.PathLike[str], run_id: str | None = None) -> Iterator[None]:
    """Hold ``folder/LOCK`` inside (the folder is created if missing).

    Raises:
        ConfigError: another live run holds the folder (its host, pid and run id named).
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    entry: dict[str, object] = {"host": socket.gethostname(), "pid": os.getpid(),
                                "run": run_id or uuid.uuid4().hex[:12], "since": time.time()}
    while not _create(path, entry):
        holder = _holder(path)
        same_host = holder.get("host") == entry["host"]
        pid = holder.get("pid")
        if same_host and isinstance(pid, int) and not _alive(pid):
            print(f"stagewise: taking over the lock of {str(root)!r} left by pid {pid} (run "
                  f"{holder.get('run')}), which is no longer running", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        raise ConfigError(
            f"checkpoint folder {str(root)!r} is in use by another run (host "
            f"{holder.get('host')}, pid {pid}, run {holder.get('run')}): wait for it to end, "
            f"use another --checkpoint-dir, or delete {str(path)!r} if that run is gone")
    try:
        yield
    finally:
        if _holder(path).get("run") == entry["run"]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
