"""Old flag spellings that still work for now, each with a one-line deprecation message.

Usage, in a verb's ``add_parser``::

    group.add_argument("--seq-len", type=int, help="tokens per sequence")
    add_deprecated(group, "--seq", "--seq-len", type=int)

The old flag stores into the new flag's ``dest`` and prints, once, to stderr:
``stagewise: warning: --seq is deprecated; use --seq-len``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["add_deprecated"]


class _Deprecated(argparse.Action):
    """Stores like ``store`` (or ``store_true`` with ``nargs=0``) and warns on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str,
                 const: Any = None, nargs: int | str | None = None, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=nargs, const=const, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"stagewise: warning: {option_string} is deprecated; use {self.new}",
              file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_deprecated(parser: argparse.ArgumentParser | argparse._ArgumentGroup, old: str,
                   new: str, *, flag: bool = False, **kwargs: Any) -> None:
    """Register ``old`` as a hidden alias of the flag ``new`` (same ``dest``).

    Args:
        parser: the parser or argument group that holds ``new``.
        old: the old spelling, e.g. ``"--seq"``.
        new: the flag to use instead, e.g. ``"--seq-len"``; its dest receives the value.
        flag: ``old`` takes no value and stores True (like ``store_true``).
        kwargs: ``type`` and the like, as for ``add_argument``.
    """
    dest = new.lstrip("-").replace("-", "_")
    if flag:
        kwargs.update(nargs=0, const=True)
    parser.add_argument(old, dest=dest, action=_Deprecated, new=new,
                        help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)
