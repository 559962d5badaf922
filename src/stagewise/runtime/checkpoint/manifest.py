"""What a complete checkpoint holds, so a damaged one is refused instead of loaded.

Rank 0 writes the completion marker ``COMPLETE`` once every rank has written its files; it is
also the manifest: the size and CRC-32 of every file in the folder (DCP's shards and metadata,
``extra.pt``). :func:`verify` reads them all back before a resume and names the first file
that is missing, shorter, longer or different (a flipped byte, a truncated or emptied shard).
Checkpoints written before manifests existed carry no ``files``: only their marker is checked.
No torch here: plain files.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

from stagewise.errors import ConfigError

__all__ = ["file_table", "read_marker", "verify", "write_marker"]

MARKER = "COMPLETE"
_CHUNK = 1 << 20


def _crc32(path: Path) -> int:
    value = 0
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def file_table(folder: Path) -> dict[str, dict[str, int]]:
    """``{file name: {"bytes": size, "crc32": checksum}}`` of every file in ``folder`` but
    the marker."""
    return {
        path.name: {"bytes": path.stat().st_size, "crc32": _crc32(path)}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != MARKER
    }


def write_marker(folder: Path, step: int, world_size: int) -> None:
    """Write the marker with the manifest of ``folder`` (durably: flushed and synced)."""
    marker = {"step": step, "world_size": world_size, "files": file_table(folder)}
    with (folder / MARKER).open("w") as file:
        json.dump(marker, file)
        file.flush()
        os.fsync(file.fileno())


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker's contents, or None when it is missing or unreadable."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def verify(folder: Path) -> None:
    """Check every file the manifest lists against its size and checksum.

    Raises:
        ConfigError: the marker is missing or unreadable, or a file is missing or differs;
            the message names the file and how to go on.
    """
    marker = read_marker(folder)
    fix = ("pass --resume-from STEP to resume from an older complete checkpoint, or remove "
           f"{str(folder)!r}")
    if marker is None:
        raise ConfigError(f"checkpoint {str(folder)!r} is damaged: its {MARKER} marker is "
                          f"missing or unreadable; {fix}")
    for name, entry in sorted(marker.get("files", {}).items()):
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"checkpoint {str(folder)!r} is damaged: {name} is missing; {fix}")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise ConfigError(f"checkpoint {str(folder)!r} is damaged: {name} has {size} bytes, "
                              f"{entry.get('bytes')} were written (truncated, emptied or "
                              f"overwritten); {fix}")
        if _crc32(path) != entry.get("crc32"):
            raise ConfigError(f"checkpoint {str(folder)!r} is damaged: {name} does not match "
                              f"its checksum (changed on disk since it was written); {fix}")
