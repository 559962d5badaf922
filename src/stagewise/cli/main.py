"""The ``stagewise`` command: parse the verb, run it, turn user errors into exit code 2.

Each verb lives in its own module with two functions: ``add_parser(subparsers)`` registers its
options and ``run(args) -> int`` does the work. Exit codes: 0 ok, 1 the run failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from stagewise import __version__
from stagewise.errors import StagewiseError

__all__ = ["cli", "main"]

# Verb name -> module under stagewise.cli that defines add_parser() and run(), and a summary
# shown by `stagewise -h`. Only the module of the verb being run is imported, so `stagewise
# bubble` starts without importing torch.
VERBS = {
    "bubble": "closed-form and simulated bubble fractions and peak activations",
    "simulate": "simulate one schedule: makespan, bubble, idle and activations per rank",
    "show": "print a schedule's actions per rank (and write it as CSV)",
    "compare": "every registered schedule side by side",
    "train": "train a model on local ranks with any schedule (or under torchrun)",
    "plan": "plan tensor x pipeline x data parallelism for a model on a cluster",
    "export": "write a checkpoint as a Hugging Face model folder (safetensors, tokenizer)",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake on one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # prog is "stagewise" for the top level and "stagewise train" for a verb.
        self.exit(2, f"stagewise: error: {message} (see {self.prog} -h)\n")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv`` given, only the verb it names is fully loaded."""
    parser = _Parser(
        prog="stagewise",
        description="Pipeline-parallel schedules: simulate, compare, draw, train and plan.",
    )
    parser.add_argument("--version", action="version", version=f"stagewise {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    chosen = next((a for a in argv or () if not a.startswith("-")), None)
    for verb, summary in VERBS.items():
        if chosen in VERBS and verb != chosen:
            verbs.add_parser(verb, help=summary)
            continue
        module = importlib.import_module(f"stagewise.cli.{verb}")
        module.add_parser(verbs)
    return parser


def cli(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` in-process and return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
        args.argv = argv  # a verb may need to know which flags were given (train --config)
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
    """Console entry point. A reader that stops early (``stagewise plan ... | head``) ends the
    output quietly, as other command-line tools do, not with a traceback."""
    try:
        code = cli()
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush goes nowhere
        code = 141  # 128 + SIGPIPE, as a shell reports a piped command cut short
    sys.exit(code)
