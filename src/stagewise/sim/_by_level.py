"""The simulator for wide pipelines: every action of a level timed at once (numpy).

The validator's round-by-round walk gives each action its level; an action's inputs, and the
action before it on its rank, all sit on earlier levels. So one level's start times are a
few array operations on what earlier levels computed: the largest of the rank's previous end
and each input's end plus its transfer, then the end is the start plus the duration. These
are the same additions and comparisons the sequential simulator makes, on the same floats,
so the times are the same to the bit.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from stagewise.schedules._rounds import LETTER_B, LETTER_F, LETTER_I, LETTER_W, Levels
from stagewise.schedules.ir import Schedule
from stagewise.sim.costs import Costs

__all__ = ["run_by_level"]


def run_by_level(schedule: Schedule, levels: Levels, costs: Costs,
                 forward_hop: list[float], grad_hop: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """When each action starts and ends, by flat index (rank after rank, rows in order).

    ``forward_hop[s]`` and ``grad_hop[s]`` are the transfer times into stage s from s - 1
    and from s + 1 (0.0 where both share a rank), as :func:`stagewise.sim.simulate.hop_tables`
    gives them.
    """
    n = len(levels.columns.stage)
    order = levels.order
    # Work in execution order, so each level is a slice: ``at[i]`` is the position of flat
    # action i in ``order`` (the end of "nothing to wait for", n, stays n).
    at = np.empty(n + 1, dtype=np.intp)
    at[order] = np.arange(n)
    at[n] = n
    before, first, second, hop_first, hop_second, duration = _tables(
        schedule, levels, costs, forward_hop, grad_hop)
    before, first, second = (at[column[order]] for column in (before, first, second))
    hop_first, hop_second, duration = (column[order] for column in (hop_first, hop_second,
                                                                     duration))
    # start and end by position in ``order``; end[n], "nothing to wait for", stays 0.0
    end = np.zeros(n + 1)
    start = np.empty(n)
    maximum = np.maximum
    for low, high in pairwise(levels.bounds):
        ready = maximum(end[before[low:high]], end[first[low:high]] + hop_first[low:high])
        maximum(ready, end[second[low:high]] + hop_second[low:high], out=ready)
        start[low:high] = ready
        np.add(ready, duration[low:high], out=end[low:high])
    return start[at[:n]], end[at[:n]]


def _tables(schedule: Schedule, levels: Levels, costs: Costs, forward_hop: list[float],
            grad_hop: list[float]) -> tuple[np.ndarray, ...]:
    """Per action (flat index): the action before it on its rank, its two inputs (``n`` for
    none), the transfer time added to each input's end, and its duration."""
    found = levels.columns
    n, stage, letter = len(found.stage), found.stage, found.letter
    before = np.arange(-1, n - 1)
    before[found.offsets[:-1][np.diff(found.offsets) > 0]] = n  # a rank's first action
    inputs = [b - w for b, w in zip(costs.backward, costs.weight, strict=True)]
    by_op = np.zeros((256, schedule.num_stages))
    by_op[[LETTER_F, LETTER_B, LETTER_I, LETTER_W]] = (
        costs.forward, costs.backward, inputs, costs.weight)
    is_forward = letter == LETTER_F
    is_grad = (letter == LETTER_B) | (letter == LETTER_I)
    hop_first = np.where(is_forward, np.asarray(forward_hop)[stage], 0.0)
    hop_second = np.where(is_grad, np.asarray(grad_hop)[stage], 0.0)
    first, second = levels.inputs
    return before, first, second, hop_first, hop_second, by_op[letter, stage]
