"""The folders of checkpoints on disk, and how a checkpoint becomes complete.

``folder/step-00000012/`` is step 12's checkpoint: DCP's files, ``extra.pt`` and the completion
marker ``COMPLETE`` (JSON naming the step). Every rank writes into ``step-00000012.partial/``;
once all have written, rank 0 writes the marker and renames the folder (atomic on one
filesystem): a save cut short leaves a ``.partial`` folder or one without a valid marker, and
neither is ever taken for a complete checkpoint. No torch here: plain files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from stagewise.errors import ConfigError

__all__ = [
    "EXTRA",
    "MARKER",
    "checkpoint_name",
    "checkpoint_step",
    "complete_checkpoints",
    "is_complete",
    "latest_checkpoint",
    "mark_complete",
    "prune",
]

MARKER = "COMPLETE"
EXTRA = "extra.pt"
_NAME = re.compile(r"^step-(\d{8})$")


def latest_checkpoint(folder: str | os.PathLike[str], required: bool = False) -> Path | None:
    """The newest complete checkpoint in ``folder``, or None.

    A folder counts only with its completion marker naming its own step; ``.partial``
    folders (a save cut short) and folders with a missing or unreadable marker are skipped.

    Args:
        folder: the checkpoint folder given to ``save_checkpoint``, or one complete checkpoint
            in it (``.../step-00000012``: that one is returned).
        required: raise instead of returning None (resume was asked for explicitly).

    Raises:
        ConfigError: ``required`` and there is no complete checkpoint.
    """
    root = Path(folder)
    if (match := _NAME.match(root.name)) and is_complete(root, int(match.group(1))):
        return root
    found = complete_checkpoints(root)
    if found:
        return found[-1][1]
    if not required:
        return None
    if not root.is_dir():
        raise ConfigError(
            f"cannot resume: checkpoint folder {str(root)!r} does not exist; check "
            "--checkpoint-dir, or drop --resume to start from scratch"
        )
    others = sorted(p.name for p in root.iterdir())
    what = f"it holds only {', '.join(others[:5])}" if others else "it is empty"
    raise ConfigError(
        f"cannot resume: no complete checkpoint in {str(root)!r} ({what}; a folder counts "
        f"once its {MARKER} marker is written); check --checkpoint-dir, or drop --resume "
        "to start from scratch"
    )


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step a complete checkpoint folder (``.../step-00000012``) holds.

    Example:
        >>> checkpoint_step("ckpt/step-00000012")
        12
    """
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ConfigError(f"{str(path)!r} is not a checkpoint folder (step-NNNNNNNN)")
    return int(match.group(1))


def checkpoint_name(step: int) -> str:
    """The folder name of step ``step``'s checkpoint: ``step-00000012``."""
    return f"step-{step:08d}"


def mark_complete(partial: Path, final: Path, step: int, world_size: int) -> None:
    """Mark ``partial`` complete and move it to ``final`` (rank 0, after every rank wrote)."""
    marker = partial / MARKER
    with marker.open("w") as file:
        json.dump({"step": step, "world_size": world_size}, file)
        file.flush()
        os.fsync(file.fileno())
    if final.exists():  # saved again at the same step: replace it
        stale = final.with_name(final.name + ".stale")
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
        partial.rename(final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        partial.rename(final)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint in ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _NAME.match(path.name)) and is_complete(path, int(match.group(1)))
    )


def is_complete(path: Path, step: int) -> bool:
    """Whether ``path`` holds a marker naming ``step`` and DCP's metadata."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("step") == step
        and (path / ".metadata").is_file()
        and (path / EXTRA).is_file()
    )


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and older ``.partial`` ones."""
    complete = complete_checkpoints(root)
    for _, path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    newest = complete[-1][0] if complete else -1
    for path in root.iterdir():
        match = re.match(r"^step-(\d{8})\.partial$", path.name)
        if match and int(match.group(1)) < newest:
            shutil.rmtree(path, ignore_errors=True)
