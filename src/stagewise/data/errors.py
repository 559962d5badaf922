"""The error the data loader raises: a :class:`~stagewise.errors.ConfigError`, so a
``ValueError``."""

from __future__ import annotations

from stagewise.errors import ConfigError

__all__ = ["DataError"]


class DataError(ConfigError):
    """A data file, a record in it, the tokenizer or the packing settings are unusable.

    The message is one line: the file (with its line or row where there is one), what is wrong
    and how to fix it. The CLI prints it and exits 2, as for every ``ConfigError``.
    """
