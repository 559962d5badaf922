"""Partitioning: exact balance against brute force, the three weightings, placement, errors."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from stagewise.errors import ConfigError  # noqa: E402
from stagewise.runtime.engine.partition import (  # noqa: E402
    balance,
    layer_weights,
    partition,
    stages_for_rank,
)
from stagewise.schedules import build  # noqa: E402


def _brute_force(weights: list[float], num_stages: int) -> float:
    """Lightest heaviest group over every way to cut ``weights`` into contiguous groups."""
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(weights)), num_stages - 1):
        bounds = (0, *cuts, len(weights))
        heaviest = max(sum(weights[a:b]) for a, b in itertools.pairwise(bounds))
        best = min(best, heaviest)
    return best


@settings(max_examples=150, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=8),
    num_stages=st.integers(min_value=1, max_value=8),
)
def test_balance_is_optimal_and_covers_every_layer(weights: list[int], num_stages: int) -> None:
    if num_stages > len(weights):
        with pytest.raises(ConfigError):
            balance(weights, num_stages)
        return
    sizes = balance(weights, num_stages)
    assert len(sizes) == num_stages
    assert sum(sizes) == len(weights)
    assert min(sizes) >= 1
    bounds = [0, *itertools.accumulate(sizes)]
    heaviest = max(sum(weights[a:b]) for a, b in itertools.pairwise(bounds))
    assert heaviest == _brute_force([float(w) for w in weights], num_stages)


def test_impossible_split_says_how_to_fix_it() -> None:
    with pytest.raises(ConfigError, match=r"cannot cut 3 layers into 4 stages.*at most 3 stages"):
        partition([nn.Linear(2, 2) for _ in range(3)], 4)


def test_even_split_keeps_layer_order() -> None:
    layers = [nn.Linear(2, 2) for _ in range(7)]
    stages = partition(layers, 3)
    assert [len(s) for s in stages] == [3, 2, 2]
    assert [layer for stage in stages for layer in stage] == layers


def test_params_split_isolates_a_heavy_head() -> None:
    layers = [nn.Linear(4, 4) for _ in range(5)] + [nn.Linear(4, 400)]
    assert [len(s) for s in partition(layers, 2, "params")] == [5, 1]


def test_time_split_needs_a_sample_and_measures_every_layer() -> None:
    # Timing-based: keep the gap huge (about 1,000x the FLOPs) so a loaded machine cannot
    # flip it, and put the heavy layer where any first-call warm-up lands on it anyway.
    wide = [nn.Linear(1024, 1024) for _ in range(4)]
    heavy = nn.Sequential(nn.Linear(8, 1024), *wide, nn.Linear(1024, 8))
    layers = [nn.Linear(8, 8), heavy, nn.Linear(8, 8)]
    with pytest.raises(ConfigError, match="sample"):
        layer_weights(layers, "time")
    times = layer_weights(layers, "time", sample=torch.randn(64, 8))
    assert len(times) == 3
    assert all(t > 0 for t in times)
    assert times[1] > times[0]
    assert times[1] > times[2]
    assert all(p.grad is None for layer in layers for p in layer.parameters())


def test_unknown_method() -> None:
    with pytest.raises(ConfigError, match="choose one of even, params, time"):
        layer_weights([nn.Linear(2, 2)], "flops")


def test_looped_placement_gives_each_rank_its_chunks() -> None:
    schedule = build("interleaved-1f1b", num_ranks=2, num_microbatches=4, num_chunks=2)
    stages = partition([nn.Linear(2, 2) for _ in range(8)], schedule.num_stages)
    mine = stages_for_rank(schedule, stages, 1)
    assert sorted(mine) == [1, 3]
    assert mine[3] is stages[3]
    with pytest.raises(ConfigError, match="partition the model into 4 stages"):
        stages_for_rank(schedule, stages[:3], 0)
