"""The ``stagewise`` command line."""

from stagewise.cli.main import cli, main

__all__ = ["cli", "main"]
