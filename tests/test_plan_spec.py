"""ParallelConfig carries the project's one mesh type; its sizes and sharding are checked."""

from __future__ import annotations

import pytest

from stagewise.errors import PlanError
from stagewise.mesh import Mesh
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
from stagewise.plan.rank import rank_sizes
from stagewise.plan.spec import DP_SHARDING, stage_layers


def test_config_reads_its_sizes_from_the_mesh() -> None:
    cfg = ParallelConfig(Mesh(pp=4, dp=2, tp=8), num_chunks=2)
    assert (cfg.tp, cfg.pp, cfg.dp, cfg.num_gpus) == (8, 4, 2, 64)
    assert cfg.describe().startswith("TP=8 PP=4 DP=2 chunks=2 ")
    assert cfg.mesh == Mesh.parse("pp=4,dp=2,tp=8")


def test_fsdp_mesh_and_weight_sharding_are_one_setting() -> None:
    fsdp = ParallelConfig(Mesh.parse("pp=1,fsdp=4,tp=2"))
    assert fsdp.dp_sharding == "weights"
    assert ParallelConfig.of(tp=2, pp=1, dp=4, dp_sharding="weights").mesh == fsdp.mesh
    assert [fsdp.shards(s) for s in DP_SHARDING[1:]] == [True, True, True]
    zero1 = ParallelConfig.of(tp=1, pp=1, dp=4, dp_sharding="optimizer")
    assert [zero1.shards(s) for s in DP_SHARDING[1:]] == [True, False, False]
    with pytest.raises(PlanError, match="fsdp= in the mesh exactly when"):
        ParallelConfig(Mesh(dp=4, dp_shard=True), dp_sharding="gradients")


@pytest.mark.parametrize("sizes", [{"tp": 0, "pp": 1, "dp": 1}, {"tp": 1, "pp": -2, "dp": 1}])
def test_bad_mesh_sizes_are_plan_errors(sizes: dict[str, int]) -> None:
    with pytest.raises(PlanError, match="integer >= 1"):
        ParallelConfig.of(**sizes)


def test_bad_knobs_name_the_value() -> None:
    with pytest.raises(PlanError, match="num_chunks must be a positive integer, got 0"):
        ParallelConfig(Mesh(), num_chunks=0)
    with pytest.raises(PlanError, match="dp_sharding must be one of"):
        ParallelConfig(Mesh(), dp_sharding="zero3")
    with pytest.raises(PlanError, match="seq_len must be a positive integer"):
        TrainingSpec(seq_len=0, global_batch=8)
    with pytest.raises(PlanError, match="precision must be one of bf16, fp8"):
        TrainingSpec(seq_len=8, global_batch=8, precision="fp4")


def test_each_sharding_stage_divides_its_state_by_dp() -> None:
    # Per trainable parameter: 2 bytes bf16 weight, 4 fp32 gradient, 12 Adam (ZeRO paper,
    # Rajbhandari et al. 2020, with Megatron's fp32 gradients): ZeRO-1 2+4+12/d, ZeRO-2
    # 2+(4+12)/d, FSDP (2+4+12)/d plus two gathered blocks.
    model, d = get_model("llama-2-7b"), 8
    cluster = Cluster(get_gpu("h100"), 1, 8)
    run = TrainingSpec(seq_len=2048, global_batch=8)
    memory = {
        s: evaluate(model, cluster, run, ParallelConfig.of(tp=1, pp=1, dp=d, dp_sharding=s)).memory
        for s in DP_SHARDING
    }
    params = memory["none"].weights / 2
    assert memory["optimizer"].model_states == pytest.approx(params * (2 + 4 + 12 / d))
    assert memory["gradients"].model_states == pytest.approx(params * (2 + 16 / d))
    assert memory["weights"].model_states == pytest.approx(params * 18 / d)
    gathered = memory["weights"].comm_buffers - memory["none"].comm_buffers
    assert gathered == pytest.approx(2 * 2 * model.layer_params)


def test_edges_split_counts_the_embedding_and_the_loss_as_one_layer_each() -> None:
    # Llama 3 405B: 126 + 2 slots over 16 stages, 8 each; the first and the last give one
    # slot to the embedding and the loss (Meta's split); 2 chunks: 4 per virtual stage.
    assert stage_layers(126, 16, "edges") == (7,) + (8,) * 14 + (7,)
    assert stage_layers(126, 32, "edges") == (3,) + (4,) * 30 + (3,)
    # 80 layers over 8 stages: balanced is 10 each; edges splits 82 (10, 10, 10, 11, 11,
    # 10, 10, 10 with the two extra in the middle) and takes one off each end.
    assert stage_layers(80, 8) == (10,) * 8
    assert stage_layers(80, 8, "edges") == (9, 10, 10, 11, 11, 10, 10, 9)
    assert sum(stage_layers(80, 8, "edges")) == 80
    with pytest.raises(PlanError, match="no layer"):
        stage_layers(4, 4, "edges")  # (1, 2, 2, 1) of 6 slots leaves the ends none
    with pytest.raises(PlanError, match="layer_split must be one of"):
        ParallelConfig.of(tp=1, pp=2, dp=1, layer_split="ends")


def test_edges_split_lowers_the_first_ranks_1f1b_activations() -> None:
    # Llama 2 70B, TP8 PP8, 1F1B with m = 16: rank r holds 8 - r micro-batches of its stage
    # (sim/closed_form.py), so rank 0 peaks at 8 x 10 = 80 layer activations balanced and
    # 8 x 9 = 72 with the edges split, where rank 1 (7 x 10 = 70) is next.
    model = get_model("llama-2-70b")
    run = TrainingSpec(seq_len=4096, global_batch=16)
    cluster = Cluster.of_gpus(get_gpu("h100"), 64)
    plans = {
        split: evaluate(model, cluster, run, ParallelConfig.of(
            tp=8, pp=8, dp=1, sequence_parallel=True, layer_split=split))
        for split in ("balanced", "edges")
    }
    per_layer = layer_activation_bytes(model, run, plans["edges"].config)
    for split, plan in plans.items():
        sizes = rank_sizes(model, run, plan.config, plan.layers, [(r,) for r in range(8)])
        peaks = PipelineCache().peak_activation_bytes_by_rank(
            "1f1b", 8, 16, 1, sizes[0].stage_bytes)
        final_norm = 2.0 * 2 * 4096 * model.hidden / 8  # the last stage's norm in and out
        expected = [(8 - r) * plan.layers[r] * per_layer for r in range(8)]
        expected[7] += final_norm
        assert peaks == pytest.approx(expected)
        assert plan.config.describe().endswith("edges-split") == (split == "edges")
    assert plans["edges"].layers[0] * 8 == 72
