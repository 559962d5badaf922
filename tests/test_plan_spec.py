"""ParallelConfig carries the project's one mesh type; its sizes and sharding are checked."""

from __future__ import annotations

import pytest

from stagewise.errors import PlanError
from stagewise.mesh import Mesh
from stagewise.plan import Cluster, ParallelConfig, TrainingSpec, evaluate, get_gpu, get_model
from stagewise.plan.spec import DP_SHARDING


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
