"""Pipeline schedules as data: the IR, the generators, the validator and the registry.

Pure Python; importing this package does not import torch.
"""

from stagewise.schedules.gpipe import gpipe
from stagewise.schedules.interleaved import interleaved_1f1b
from stagewise.schedules.ir import Action, Op, Schedule, parse_action
from stagewise.schedules.one_f_one_b import one_f_one_b
from stagewise.schedules.registry import Generator, build, get, names, register
from stagewise.schedules.validate import check, execution_order, is_valid

__all__ = [
    "Action",
    "Generator",
    "Op",
    "Schedule",
    "build",
    "check",
    "execution_order",
    "get",
    "gpipe",
    "interleaved_1f1b",
    "is_valid",
    "names",
    "one_f_one_b",
    "parse_action",
    "register",
]

# Registers looped-bfs, zb-h1, zb-h2, zb-v and dualpipev (issue 5).
import stagewise.schedules._register_zb  # noqa: F401
