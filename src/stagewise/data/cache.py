"""The on-disk cache of packed data: one folder per key, written atomically.

A folder ``<cache_dir>/packed/<key>/`` holds ``tokens.npy`` (int32, ``(num_sequences,
seq_len + 1)``), ``in_loss.npy`` (bool, ``(num_sequences, seq_len)``) and ``meta.json``. It is
written under a temporary name and renamed into place, so a reader never sees half of one;
the arrays are opened memory-mapped, so ranks on one machine share the page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stagewise.data.encode import Packed
from stagewise.data.errors import DataError

__all__ = ["FORMAT_VERSION", "cache_key", "default_cache_dir", "load_entry", "save_entry"]

# Bump when tokenising or packing changes what a key's folder holds.
FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/stagewise``, or ``~/.cache/stagewise``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stagewise"


def cache_key(files: Sequence[Path], tokenizer_fingerprint: str, seq_len: int) -> str:
    """The key of the packed data of ``files``: a hash of each file's absolute path, size and
    modification time (ns), the tokenizer's fingerprint, ``seq_len`` and :data:`FORMAT_VERSION`.
    """
    stats = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
             for path in files]
    described = {"version": FORMAT_VERSION, "seq_len": seq_len,
                 "tokenizer": tokenizer_fingerprint, "files": stats}
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:32]


def load_entry(folder: Path) -> tuple[Packed, dict[str, Any]] | None:
    """The packed rows, flags and metadata cached in ``folder``, or ``None`` if absent."""
    if not (folder / "meta.json").is_file():
        return None
    meta: dict[str, Any] = json.loads((folder / "meta.json").read_text())
    tokens = np.load(folder / "tokens.npy", mmap_mode="r")
    in_loss = np.load(folder / "in_loss.npy", mmap_mode="r")
    return (tokens, in_loss), meta


def save_entry(folder: Path, packed: Packed, meta: dict[str, Any]) -> None:
    """Write ``packed`` and ``meta`` to ``folder`` atomically (a temporary folder renamed).

    If another process wrote the same folder first, its copy is kept.

    Raises:
        DataError: the cache folder cannot be written.
    """
    temporary = folder.parent / f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        temporary.mkdir(parents=True)
        np.save(temporary / "tokens.npy", packed[0])
        np.save(temporary / "in_loss.npy", packed[1])
        (temporary / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.replace(temporary, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
    except OSError as err:
        raise DataError(f"cannot write the data cache in {folder.parent}: {err.strerror}; "
                        "give a writable cache folder (or set XDG_CACHE_HOME)") from err
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
