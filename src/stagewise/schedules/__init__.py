"""Pipeline schedules as data: the IR, the generators, the validator, the registry.

Pure Python; importing this package does not import torch. It depends on nothing in stagewise
but ``stagewise.errors``: the schedule search (and the ``auto`` schedule it registers) lives in
:mod:`stagewise.search`, above the simulator.
"""

# Importing _register_zb registers looped-bfs, zb-h1, zb-h2, zb-v and dualpipev.
import stagewise.schedules._register_zb  # noqa: F401
from stagewise.schedules.dualpipe import dualpipe_v
from stagewise.schedules.gpipe import gpipe
from stagewise.schedules.interleaved import interleaved_1f1b
from stagewise.schedules.ir import Action, Op, Schedule, parse_action
from stagewise.schedules.looped_bfs import looped_bfs
from stagewise.schedules.one_f_one_b import one_f_one_b
from stagewise.schedules.registry import Generator, build, get, names, register
from stagewise.schedules.validate import check, execution_order, is_valid
from stagewise.schedules.zbv import zb_v
from stagewise.schedules.zero_bubble import zb_h1, zb_h2

__all__ = [
    "Action",
    "Generator",
    "Op",
    "Schedule",
    "build",
    "check",
    "dualpipe_v",
    "execution_order",
    "get",
    "gpipe",
    "interleaved_1f1b",
    "is_valid",
    "looped_bfs",
    "names",
    "one_f_one_b",
    "parse_action",
    "register",
    "zb_h1",
    "zb_h2",
    "zb_v",
]
