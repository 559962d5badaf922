"""Interleaved 1F1B's live activations as Megatron-LM runs it, and Llama 3 405B's verdict.

Megatron-LM (megatron/core/pipeline_parallel/schedules.py, ``get_pp_rank_microbatches``)
starts rank r of p with 2(p - r - 1) + (v - 1) N warm-up forwards of its v chunks, N being
``--microbatch-group-size-per-virtual-pipeline-stage`` (default p, and it refuses N < p or
N > m), then alternates one forward and one backward, forward first: rank r holds
min(v m, 2(p - r - 1) + (v - 1) N + 1) chunk-micro-batches at its peak. stagewise's
generator builds N = p (groups of p micro-batches when p divides m) and has no group-size
parameter, so N = p is what the planner counts.
"""

from __future__ import annotations

import pytest

from stagewise.plan import (
    Cluster,
    ParallelConfig,
    PipelineCache,
    TrainingSpec,
    evaluate,
    get_gpu,
    get_model,
    layer_activation_bytes,
)
from stagewise.plan.evaluate import Plan
from stagewise.plan.memory import GIB
from stagewise.schedules import build
from stagewise.sim import simulate


def _megatron_peak(p: int, m: int, v: int, r: int) -> int:
    return min(v * m, 2 * (p - r - 1) + (v - 1) * p + 1)


@pytest.mark.parametrize(("p", "m", "v"), [(16, 32, 2), (16, 16, 2), (16, 32, 4), (4, 12, 3)])
def test_simulated_peak_is_megatrons_warmup_plus_one(p: int, m: int, v: int) -> None:
    timeline = simulate(build("interleaved-1f1b", num_ranks=p, num_microbatches=m, num_chunks=v))
    cache = PipelineCache()
    ones = [1.0] * (p * v)
    for r in range(p):
        # The timeline counts in whole-stage units: a chunk-micro-batch is 1/v of one.
        assert timeline.peak_activations(r) * v == pytest.approx(_megatron_peak(p, m, v, r))
        assert cache.peak_activation_bytes("interleaved-1f1b", p, m, v, r, ones) == (
            _megatron_peak(p, m, v, r))


def _llama3_405b(num_gpus: int, dp: int, v: int, split: str = "balanced"
                 ) -> tuple[Plan, float]:
    model = get_model("llama-3-405b")
    training = TrainingSpec(seq_len=8192, global_batch=2048)
    config = ParallelConfig.of(
        tp=8, pp=16, dp=dp, num_chunks=v, micro_batch_size=1, sequence_parallel=True,
        dp_sharding="gradients", schedule="interleaved-1f1b" if v > 1 else "1f1b",
        layer_split=split,
    )
    plan = evaluate(model, Cluster.of_gpus(get_gpu("h100"), num_gpus), training, config)
    return plan, layer_activation_bytes(model, training, config)


def test_llama3_405b_interleaved_on_8192_gpus_does_not_fit_by_megatrons_count() -> None:
    # 126 layers over 32 virtual stages: 3 on the first and the last (the embedding and the
    # head take the place of one layer each, as Meta and Megatron's account-for-embedding/
    # loss split do), 4 elsewhere. m = 2048 / 64 = 32. Rank 1 (stages 1 and 17, 4 layers
    # each) holds 2 x 14 + 16 + 1 = 45 chunk-micro-batches of 4 layers: 180 layer activations.
    plan, per_layer = _llama3_405b(8192, 64, 2)
    assert plan.layers == (3,) + (4,) * 30 + (3,)
    assert plan.memory.rank == 1
    assert plan.memory.activations == pytest.approx(45 * 4 * per_layer)
    assert not plan.fits
    assert plan.memory.total / GIB > 95
    # Four chunks: 2 x 14 + 3 x 16 + 1 = 77 chunk-micro-batches of 2 layers (154).
    plan4, _ = _llama3_405b(8192, 64, 4)
    assert plan4.memory.activations == pytest.approx(77 * 2 * per_layer)
    assert not plan4.fits
    # 1F1B: rank 1 holds 15 micro-batches of its 8 layers (120), which fits.
    plan1, _ = _llama3_405b(8192, 64, 1)
    assert plan1.memory.activations == pytest.approx(15 * 8 * per_layer)
    assert plan1.fits


def test_llama3_405b_as_meta_ran_it_one_layer_a_chunk_fits_on_8192_gpus() -> None:
    # Llama 3 (sec. 3.3.2): the first chunk of the first rank holds only the embedding, the
    # last chunk of the last rank only the head and loss: 126 + 2 slots over 16 x 8 chunks.
    # Rank 1 then holds 2 x 14 + 7 x 16 + 1 = 141 chunk-micro-batches of one layer, fewer
    # than the 154 of two-layer chunks at v = 4, and the plan fits; rank 0 holds seven
    # layers and the embedding.
    plan, per_layer = _llama3_405b(8192, 64, 8, "edges")
    assert plan.layers == (0,) + (1,) * 126 + (0,)
    assert plan.memory.rank == 1
    assert plan.memory.activations == pytest.approx(141 * per_layer)
    assert plan.fits
    assert 70 < plan.memory.total / GIB < 79.6


def test_llama3_405b_interleaved_on_16384_gpus_fits() -> None:
    # m = 2048 / 128 = 16 = p: every rank up to 7 runs all 2 x 16 forwards before its first
    # backward (its warm-up 2(p - r - 1) + p is at least v m = 32): 16 x 4 + 16 x 4 layers on
    # rank 1: 128 layer activations.
    plan, per_layer = _llama3_405b(16384, 128, 2)
    assert plan.memory.activations == pytest.approx(32 * 4 * per_layer)
    assert plan.fits
