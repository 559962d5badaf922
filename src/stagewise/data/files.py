"""Data files: which ones a list of paths names, and the records inside each.

A record is one JSON object (a line of a ``.jsonl`` file, a row of a parquet file) or a whole
``.txt`` file as ``{"text": ...}``; :mod:`stagewise.data.documents` decides what it means.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stagewise.data.errors import DataError

__all__ = ["SUFFIXES", "Record", "data_files", "read_records"]

# Supported file types. ``.json`` is JSON lines too, or one JSON array of objects.
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".arrow")
_SUPPORTED = ", ".join(SUFFIXES)


@dataclass(frozen=True)
class Record:
    """One record of a data file: ``where`` names it in messages (``file:line``)."""

    where: str
    fields: Mapping[str, object]


def data_files(paths: Sequence[str | Path]) -> list[Path]:
    """The data files ``paths`` name, in order: a folder means every supported file under it
    (sorted by path, hidden files and folders skipped); a file is taken as it is.

    Raises:
        DataError: a path does not exist, a file has an unsupported type, a folder holds no
            supported file, or no path was given.
    """
    if not paths:
        raise DataError(f"no data files given; pass files ({_SUPPORTED}) or folders of them")
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"data path {path} does not exist; pass a file ({_SUPPORTED}) "
                            "or a folder of them")
        if path.is_dir():
            inside = sorted(
                f for f in path.rglob("*")
                if f.is_file() and f.suffix.lower() in SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(path).parts))
            if not inside:
                raise DataError(f"data folder {path} holds no supported files ({_SUPPORTED})")
            found.extend(inside)
        elif path.suffix.lower() not in SUFFIXES:
            raise DataError(f"{path}: unsupported data file type '{path.suffix}'; "
                            f"supported: {_SUPPORTED}")
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def read_records(path: Path) -> Iterator[Record]:
    """The records of one data file, in file order.

    Args:
        path: a file :func:`data_files` returned.

    Raises:
        DataError: the file is not UTF-8, a line is not a JSON object, or the ``datasets``
            library cannot read it.
    """
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".arrow"):
        yield from _table_records(path, suffix[1:])
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                        "convert it to UTF-8") from err
    if suffix == ".txt":
        yield Record(str(path), {"text": text})
    elif suffix == ".json" and text.lstrip().startswith("["):
        yield from _array_records(path, text)
    else:
        yield from _line_records(path, text)


def _line_records(path: Path, text: str) -> Iterator[Record]:
    """JSON lines: one object per line, blank lines skipped."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not JSON ({err.msg}, column {err.colno}); each line "
                            'must be one JSON object such as {"text": "..."}') from err
        yield _as_record(where, value)


def _array_records(path: Path, text: str) -> Iterator[Record]:
    """A ``.json`` file holding one array of objects."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not JSON ({err.msg}); a .json file holds JSON "
                        "lines or one array of objects") from err
    for index, value in enumerate(values):
        yield _as_record(f"{path}: item {index}", value)


def _as_record(where: str, value: object) -> Record:
    if not isinstance(value, dict):
        raise DataError(f"{where}: a JSON {type(value).__name__} where an object was expected, "
                        'such as {"text": "..."}')
    return Record(where, value)


def _table_records(path: Path, builder: str) -> Iterator[Record]:
    """The rows of a parquet or Arrow file, streamed by ``datasets.load_dataset`` (local only,
    no Arrow copy written)."""
    import datasets

    try:
        rows = iter(datasets.load_dataset(builder, data_files=str(path), split="train",
                                          streaming=True))
        index = 0
        while (row := next(rows, None)) is not None:
            yield Record(f"{path}: row {index}", row)
            index += 1
    except DataError:
        raise
    except Exception as err:  # datasets and pyarrow raise many types; all mean "unreadable"
        reason = " ".join(str(err).split())
        raise DataError(f"{path}: cannot read it as {builder}: {reason}") from err
