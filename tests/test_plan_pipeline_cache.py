"""The planner's pipeline cache against full simulations: steady-state extrapolation, memory."""

from __future__ import annotations

from dataclasses import replace

import pytest

from stagewise.plan.pipeline_cache import PipelineCache, reduced_microbatches
from stagewise.schedules import build
from stagewise.sim import Costs, Link, simulate

# (schedule, p, v): every searched family; even middle stages, heavier first and last ones.
CASES = [("1f1b", 4, 1), ("interleaved-1f1b", 4, 2), ("zb-h1", 4, 1), ("zb-h2", 3, 1),
         ("zb-v", 4, 2), ("dualpipev", 4, 2), ("gpipe", 3, 1)]


def _costs(stages: int) -> tuple[list[float], list[float], list[float], list[float]]:
    forward = [1.0] * stages
    forward[0], forward[-1] = 1.04, 1.3  # embedding; output head and loss
    backward = [2.0 * f for f in forward]
    return forward, backward, [0.9 * f for f in forward], [0.0] * stages


def test_reduced_microbatches_keep_the_residue_mod_p() -> None:
    assert reduced_microbatches(4, 12) == (12, 12)
    assert reduced_microbatches(4, 103) == (11, 15)  # 103 = 11 (mod 4)
    assert reduced_microbatches(4, 103, "dualpipev") == (15, 19)


@pytest.mark.parametrize(("name", "p", "v"), CASES)
@pytest.mark.parametrize("m", [37, 64])
def test_extrapolated_step_matches_the_full_simulation(name: str, p: int, v: int, m: int) -> None:
    forward, backward, weight, hops = _costs(p * v)
    run = PipelineCache().run(name, p, m, v, forward, backward, weight, hops)
    schedule = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
    costs = Costs.per_stage(forward=forward, backward=backward, weight=weight, send_bytes=hops)
    full = simulate(schedule, costs, Link(latency=0.0, bandwidth=1.0))
    # The cache snaps costs to a 2 % grid (only the idle time sees it): 0.1 %; the
    # extrapolation is exact for 1F1B, ZB and DualPipeV; interleaving's within 0.5 %.
    assert run.makespan == pytest.approx(full.makespan, rel=5e-3 if v > 1 else 1e-3)


@pytest.mark.parametrize(("name", "p", "v"), CASES)
def test_peak_activations_match_the_full_schedule(name: str, p: int, v: int) -> None:
    m, cache = 41, PipelineCache()
    schedule = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
    stage_bytes = [float(s + 1) for s in range(p * v)]
    forward, backward, weight, hops = _costs(p * v)
    costs = Costs.per_stage(forward=forward, backward=backward, weight=weight, send_bytes=hops)
    full = replace(simulate(schedule, costs, Link(latency=0.0, bandwidth=1.0)),
                   activation_bytes=tuple(stage_bytes))
    for rank in range(p):
        expected = full.peak_activations(rank, in_bytes=True)
        assert cache.peak_activation_bytes(name, p, m, v, rank, stage_bytes) == expected
