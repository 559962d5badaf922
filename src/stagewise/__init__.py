"""stagewise: pipeline-parallel training for PyTorch, with schedules as data.

The schedule IR, the simulator, the schedule search and the planner are pure Python;
``import stagewise`` does not import torch. The runtime names (``Pipeline``, ``partition``,
``launch``, ...) are loaded on first use, which imports torch then.

Example:
    >>> import stagewise
    >>> sched = stagewise.schedules.build("1f1b", num_ranks=4, num_microbatches=8)
    >>> round(stagewise.simulate(sched).bubble().vs_ideal, 3)
    0.375
"""

from __future__ import annotations

import importlib
from typing import Any

# stagewise.search sits above schedules and sim; importing it registers the `auto` schedule.
from stagewise import schedules, search, sim
from stagewise.errors import ConfigError, PlanError, RuntimeFailure, ScheduleError, StagewiseError
from stagewise.schedules import Action, Op, Schedule, build, names
from stagewise.sim import Costs, Link, Timeline, simulate

__version__ = "0.1.0"

# Names served by the runtime (torch) and the subpackages imported only when asked for.
_RUNTIME = ("Pipeline", "RankContext", "launch", "partition", "stages_for_rank")
_LAZY_MODULES = ("runtime", "viz", "plan", "cli")

__all__ = [
    "Action",
    "ConfigError",
    "Costs",
    "Link",
    "Op",
    "Pipeline",
    "PlanError",
    "RankContext",
    "RuntimeFailure",
    "Schedule",
    "ScheduleError",
    "StagewiseError",
    "Timeline",
    "build",
    "launch",
    "names",
    "partition",
    "schedules",
    "search",
    "sim",
    "simulate",
    "stages_for_rank",
]


def __getattr__(name: str) -> Any:
    """Load runtime names (and torch) or a heavier subpackage on first access."""
    if name in _RUNTIME:
        return getattr(importlib.import_module("stagewise.runtime"), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"stagewise.{name}")
    raise AttributeError(f"module 'stagewise' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_RUNTIME, *_LAZY_MODULES})
