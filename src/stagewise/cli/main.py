"""The ``stagewise`` command: parse the verb, run it, turn user errors into exit code 2.

Each verb lives in its own module with two functions: ``add_parser(subparsers)`` registers its
options and ``run(args) -> int`` does the work. Exit codes: 0 ok, 1 the run failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from stagewise.errors import StagewiseError

__all__ = ["cli", "main"]

# Verb name -> module under stagewise.cli that defines add_parser() and run().
VERBS = ("bubble", "simulate", "show", "compare", "train", "plan")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake on one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"stagewise: error: {message} (see stagewise {self.prog.split()[-1]} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="stagewise",
        description="Pipeline-parallel schedules: simulate, compare, draw, train and plan.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    for verb in VERBS:
        module = importlib.import_module(f"stagewise.cli.{verb}")
        module.add_parser(verbs)
    return parser


def cli(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` in-process and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        code: int = args.run(args)
        return code
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 2
    except StagewiseError as err:
        message = " ".join(str(err).split("\n")[0].split())
        print(f"stagewise: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stagewise: interrupted", file=sys.stderr)
        return 130


def main() -> None:
    """Console entry point."""
    sys.exit(cli())
