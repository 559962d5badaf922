"""Cut a model given as a sequence of layers into pipeline stages.

Three ways to weigh a layer: ``"even"`` (every layer counts 1), ``"params"`` (its parameter
count; the embedding and the head count like any other layer) and ``"time"`` (its measured
forward plus backward time on a sample input). Stages are contiguous runs of layers chosen to
make the heaviest stage as light as possible. The same cut serves looped (interleaved) and
V-shaped placements: cut into ``schedule.num_stages`` stages and give each rank the stages the
placement names (:func:`stages_for_rank`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from stagewise.errors import ConfigError
from stagewise.schedules.ir import Schedule

__all__ = ["balance", "layer_weights", "partition", "stages_for_rank"]

METHODS = ("even", "params", "time")


def balance(weights: Sequence[float], num_stages: int) -> list[int]:
    """Sizes of ``num_stages`` contiguous groups of ``weights`` minimising the heaviest group.

    Exact for the heaviest group (dynamic programming over cut points); among equally heavy
    cuts it prefers even ones. Every group holds at least one layer.

    Raises:
        ConfigError: fewer layers than stages.

    Example:
        >>> balance([1, 1, 1, 1, 4], 2)
        [4, 1]
    """
    n = len(weights)
    if num_stages < 1 or n < num_stages:
        raise ConfigError(
            f"cannot cut {n} layers into {num_stages} stages: every stage needs at least one "
            f"layer; use at most {n} stages (fewer ranks or chunks) or split the model finer"
        )
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    inf = (float("inf"), float("inf"))
    # best[k][i]: (heaviest group, sum of squared group weights) for the first i layers in k
    # groups, smallest first; the second term prefers even groups among equally heavy cuts.
    # cut[k][i]: where the last group starts. Ties go to later cuts (earlier stages fuller).
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, num_stages + 1):
        for i in range(k, n - (num_stages - k) + 1):
            for j in range(k - 1, i):
                group = prefix[i] - prefix[j]
                heaviest, squares = best[k - 1][j]
                value = (max(heaviest, group), squares + group * group)
                if value <= best[k][i]:
                    best[k][i], cut[k][i] = value, j
    sizes, i = [], n
    for k in range(num_stages, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def layer_weights(
    layers: Sequence[nn.Module], method: str = "even", sample: torch.Tensor | None = None
) -> list[float]:
    """Weight of each layer for :func:`balance` (see the module docstring).

    Raises:
        ConfigError: unknown method, or ``"time"`` without a sample input.
    """
    if method == "even":
        return [1.0] * len(layers)
    if method == "params":
        return [float(sum(p.numel() for p in layer.parameters())) for layer in layers]
    if method == "time":
        if sample is None:
            raise ConfigError("method='time' needs a sample input batch: pass sample=...")
        return _measure(layers, sample)
    raise ConfigError(f"unknown partition method {method!r}: choose one of {', '.join(METHODS)}")


def _measure(layers: Sequence[nn.Module], sample: torch.Tensor, repeats: int = 3) -> list[float]:
    """Fastest forward+backward seconds of each layer, fed the previous layer's output.

    One untimed warm-up run per layer first; the minimum of the timed runs is the figure least
    disturbed by other load on the machine.
    """
    times = []
    x = sample
    for layer in layers:
        runs = []
        for attempt in range(repeats + 1):
            leaf = x.detach().requires_grad_(x.is_floating_point())
            start = time.perf_counter()
            out = layer(leaf)
            out.float().sum().backward()
            if attempt:
                runs.append(time.perf_counter() - start)
        layer.zero_grad(set_to_none=True)
        times.append(min(runs))
        with torch.no_grad():
            x = layer(x)
    return times


def partition(
    layers: Sequence[nn.Module],
    num_stages: int,
    method: str = "even",
    sample: torch.Tensor | None = None,
) -> list[nn.Sequential]:
    """Cut ``layers`` into ``num_stages`` contiguous stages, each an ``nn.Sequential``.

    Args:
        layers: the model, first layer first (embedding and head included).
        num_stages: stages to make; for a schedule, ``schedule.num_stages`` (p x v).
        method: ``"even"``, ``"params"`` or ``"time"``.
        sample: an input batch for the first layer (``"time"`` only).

    Raises:
        ConfigError: fewer layers than stages, unknown method.

    Example:
        >>> stages = partition([nn.Linear(2, 2) for _ in range(5)], 2)
        >>> [len(s) for s in stages]
        [3, 2]
    """
    sizes = balance(layer_weights(layers, method, sample), num_stages)
    stages, start = [], 0
    for size in sizes:
        stages.append(nn.Sequential(*layers[start : start + size]))
        start += size
    return stages


def stages_for_rank(
    schedule: Schedule, stages: Sequence[nn.Module], rank: int
) -> dict[int, nn.Module]:
    """The ``{stage: module}`` that ``rank`` holds under ``schedule``'s placement.

    Raises:
        ConfigError: the number of modules differs from the schedule's number of stages.
    """
    if len(stages) != schedule.num_stages:
        raise ConfigError(
            f"schedule {schedule.name!r} has {schedule.num_stages} stages but {len(stages)} "
            f"modules were given: partition the model into {schedule.num_stages} stages"
        )
    return {s: stages[s] for s in schedule.stages_of(rank)}
