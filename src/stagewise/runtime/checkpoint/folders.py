"""The folders of checkpoints on disk, and how a checkpoint becomes complete.

``folder/step-00000012/`` is step 12's checkpoint: DCP's files, ``extra.pt`` and the completion
marker ``COMPLETE`` (JSON naming the step, with the size and checksum of every file: see
``manifest``). Every rank writes into ``step-00000012.partial/``;
once all have written, rank 0 writes the marker and renames the folder (atomic on one
filesystem): a save cut short leaves a ``.partial`` folder or one without a valid marker, and
neither is ever taken for a complete checkpoint. A resume takes the newest ``step-*`` folder
only if it is whole (:func:`resume_checkpoint`): a damaged one is refused with the file named,
never silently replaced by an older one. No torch here: plain files.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from stagewise.errors import ConfigError
from stagewise.runtime.checkpoint.manifest import MARKER, read_marker, verify, write_marker

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
    "resume_checkpoint",
]

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
    """Mark ``partial`` complete (the marker with its manifest) and move it to ``final``
    (rank 0, after every rank wrote)."""
    write_marker(partial, step, world_size)
    if final.exists():  # saved again at the same step: replace it
        stale = final.with_name(final.name + ".stale")
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
        partial.rename(final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        partial.rename(final)


def resume_checkpoint(folder: str | os.PathLike[str], step: int | None = None,
                      check: bool = True) -> Path:
    """The checkpoint a resume starts from: step ``step``'s, or else the newest ``step-*``
    folder, which must be whole (a ``.partial`` folder, a save cut short, is skipped).

    Args:
        folder: the checkpoint folder.
        step: resume from this step's checkpoint (``--resume-from``); None: the newest.
        check: verify every file against the manifest (do it once, before launch).

    Raises:
        ConfigError: no checkpoint; the newest (or the asked-for) one is damaged, naming the
            file and the newest older complete step to pass as ``--resume-from``.
    """
    root = Path(folder)
    if step is None and _NAME.match(root.name):
        return resume_checkpoint(root.parent, checkpoint_step(root), check)
    latest_checkpoint(root, required=True)  # the messages for no checkpoint at all
    named = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)))
    if step is not None:
        chosen = [path for number, path in named if number == step]
        if not chosen:
            have = ", ".join(str(n) for n, _ in complete_checkpoints(root)) or "none"
            raise ConfigError(f"--resume-from {step}: {str(root)!r} has no checkpoint of step "
                              f"{step} (complete ones: steps {have})")
        path = chosen[0]
    else:
        path = named[-1][1]
    try:
        if check or not is_complete(path, checkpoint_step(path)):
            verify(path)
        if not is_complete(path, checkpoint_step(path)):
            raise ConfigError(f"checkpoint {str(path)!r} is damaged: its {MARKER} marker names "
                              "another step, or .metadata or extra.pt is missing")
    except ConfigError as err:
        older = [n for n, p in complete_checkpoints(root) if n < checkpoint_step(path)]
        hint = f"; the newest older complete one is step {older[-1]}" if older else ""
        raise ConfigError(f"{err}{hint}") from None
    return path


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
    marker = read_marker(path)
    return (
        marker is not None
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
