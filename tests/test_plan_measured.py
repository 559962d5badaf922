"""Step predictions from measured costs (``benchmarks/measured_step.py``, which serves the
``mesh_layouts`` benchmark): the simulator path and the shared-cores model."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from stagewise.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from measured_step import MeasuredCosts, predict_step, shared_cores_step

from stagewise.schedules import Schedule, build
from stagewise.sim import Link, simulate

CASES = [("gpipe", 2, 4, None), ("1f1b", 4, 8, None), ("interleaved-1f1b", 2, 4, 2),
         ("zb-h1", 3, 6, None), ("zb-v", 2, 4, None), ("1f1b", 1, 1, None)]


def _costs(schedule: Schedule, seed: int) -> MeasuredCosts:
    rng = random.Random(seed)
    n = schedule.num_stages

    def draw(low: float, high: float) -> tuple[float, ...]:
        return tuple(rng.uniform(low, high) for _ in range(n))

    return MeasuredCosts(draw(1, 2), draw(2, 4), draw(0, 1e3), draw(0, 3), draw(0, 0.5),
                         loss_reduce=rng.uniform(0, 0.2))


def _schedule(name: str, ranks: int, microbatches: int, chunks: int | None) -> Schedule:
    return build(name, num_ranks=ranks, num_microbatches=microbatches, num_chunks=chunks)


@pytest.mark.parametrize(("name", "ranks", "microbatches", "chunks"), CASES)
def test_enough_cores_is_the_simulator(
    name: str, ranks: int, microbatches: int, chunks: int | None
) -> None:
    schedule = _schedule(name, ranks, microbatches, chunks)
    costs, link = _costs(schedule, 1), Link(latency=0.3, bandwidth=2e3)
    free = predict_step(schedule, costs, link)
    shared = shared_cores_step(schedule, costs, link, cores=2 * ranks, replicas=2)
    assert free.pipeline == pytest.approx(simulate(schedule, costs.costs(), link).makespan)
    assert shared.pipeline == pytest.approx(free.pipeline)
    assert shared.rank_ends == pytest.approx(free.rank_ends)
    assert free.tail > 0


@pytest.mark.parametrize(("name", "ranks", "microbatches", "chunks"), CASES)
@pytest.mark.parametrize("cores", [1, 1.5, 3])
def test_shared_cores_between_bounds(
    name: str, ranks: int, microbatches: int, chunks: int | None, cores: float
) -> None:
    """Full speed is a lower bound, every rank slowed by ranks/cores an upper one, and the
    cores cannot do the whole compute faster than cores allow."""
    schedule = _schedule(name, ranks, microbatches, chunks)
    costs, link, replicas = _costs(schedule, 2), Link(latency=0.2), 2
    shared = shared_cores_step(schedule, costs, link, cores=cores, replicas=replicas)
    factor = max(1.0, ranks * replicas / cores)
    assert predict_step(schedule, costs, link).step <= shared.step + 1e-9
    assert shared.step <= predict_step(schedule, costs, link, factor=factor).step + 1e-9
    m = schedule.num_microbatches
    work = replicas * (m * sum(costs.forward + costs.backward) + sum(costs.optimizer))
    assert shared.step >= work / cores - 1e-9


def test_one_rank_replicas_share_one_core_exactly() -> None:
    schedule = _schedule("1f1b", 1, 3, None)
    costs = MeasuredCosts((1.0,), (2.0,), (0.0,), (0.5,), (0.25,), loss_reduce=0.1)
    # 3 micro-batches of F + B at half speed, then the reductions, then the optimizer.
    assert shared_cores_step(schedule, costs, Link(), cores=1, replicas=2).step == (
        pytest.approx(2 * 9 + 0.5 + 0.1 + 2 * 0.25)
    )
    assert predict_step(schedule, costs, Link()).step == pytest.approx(9 + 0.5 + 0.1 + 0.25)


def test_wrong_sizes_are_config_errors() -> None:
    schedule = _schedule("1f1b", 2, 2, None)
    one = MeasuredCosts((1.0,), (2.0,), (0.0,), (0.0,), (0.0,))
    with pytest.raises(ConfigError, match="2"):
        predict_step(schedule, one, Link())
    with pytest.raises(ConfigError, match="cores"):
        shared_cores_step(_schedule("1f1b", 1, 1, None), one, Link(), cores=0)
    with pytest.raises(ConfigError, match="backward"):
        MeasuredCosts((1.0,), (2.0, 1.0), (0.0,), (0.0,), (0.0,))
