"""The error types stagewise raises.

One base class, :class:`StagewiseError`. User mistakes raise a subclass that is also a
``ValueError`` so callers that only know the standard library still catch them. Messages say
what is wrong, with the values, and how to fix it; the CLI prints them on one line and exits 2.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "PlanError",
    "RuntimeFailure",
    "ScheduleError",
    "StagewiseError",
]


class StagewiseError(Exception):
    """Base class of every error stagewise raises on purpose."""


class ScheduleError(StagewiseError, ValueError):
    """A schedule (built, loaded or hand-written) is invalid or cannot be built."""


class ConfigError(StagewiseError, ValueError):
    """A parameter, a file or a command-line option is invalid."""


class PlanError(StagewiseError, ValueError):
    """A parallelism plan or its inputs (model, GPU, cluster) are invalid."""


class RuntimeFailure(StagewiseError):  # noqa: N818 - a public name; renaming breaks users
    """A pipeline run failed on some rank; the message names the rank and its action."""
