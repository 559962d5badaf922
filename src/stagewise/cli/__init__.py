"""The ``stagewise`` command line; ``cli(argv) -> int`` runs it in-process."""

from stagewise.cli.main import cli

__all__ = ["cli"]
