"""Tensor parallelism (and FSDP on the dp axis): sharded runs equal to one process.

Each multi-process run compares loss and every gradient (sharded ones gathered whole) with a
deep copy of the unsharded model trained in one process on the whole global batch, over 2
optimizer steps, and checks replicated parameters' gradients agree over the tp ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from stagewise.errors import ConfigError

if TYPE_CHECKING:  # mypy reads torch's types; at run time, skip without torch
    import torch
else:
    torch = pytest.importorskip("torch")

from stagewise.runtime import launch
from stagewise.runtime.models.tiny_gpt import GPTConfig, gpt_layers, tp_plan
from stagewise.runtime.models.tp_plans import known_blocks_plan, llama_plan
from stagewise.runtime.parallel.mesh import Mesh, check_shard_replicas
from stagewise.runtime.parallel.tensor_parallel import (
    apply_tensor_parallel,
    check_tensor_parallel,
)
from stagewise.schedules.registry import build
from workers.mesh import check_mesh_rank


def test_parse_with_tp() -> None:
    assert Mesh.parse("pp=2,dp=2,tp=2") == Mesh(pp=2, dp=2, tp=2)
    assert Mesh.parse("tp=4, pp=2") == Mesh(pp=2, dp=1, tp=4)
    assert Mesh.parse("tp=2,dp=3,pp=2", world_size=12).world_size == 12
    with pytest.raises(ConfigError, match=r"needs pp\*dp\*tp = 8 ranks but the world has 4"):
        Mesh.parse("pp=2,dp=2,tp=2", world_size=4)
    with pytest.raises(ConfigError, match="tp=0"):
        Mesh.parse("pp=2,tp=0")


def test_parse_fsdp_is_sharded_dp() -> None:
    assert Mesh.parse("pp=2,fsdp=2,tp=2") == Mesh(pp=2, dp=2, tp=2, dp_shard=True)
    assert Mesh.parse("fsdp=4").world_size == 4
    with pytest.raises(ConfigError, match="dp and fsdp are the same axis"):
        Mesh.parse("dp=2,fsdp=2")


def test_fsdp_refuses_split_backward_and_ties() -> None:
    check_shard_replicas(build("interleaved-1f1b", num_ranks=2, num_microbatches=4))
    with pytest.raises(ConfigError, match=r"cannot run schedule 'zb-h1'.*I and W.*1f1b"):
        check_shard_replicas(build("zb-h1", num_ranks=2, num_microbatches=4))
    with pytest.raises(ConfigError, match="tied across stages"):
        check_shard_replicas(build("1f1b", num_ranks=2, num_microbatches=4), [{0: "w", 1: "w"}])


def test_check_counts_blocks_and_names_what_does_not_divide() -> None:
    model = torch.nn.Sequential(*gpt_layers(GPTConfig(dim=16, heads=4, layers=3)))
    assert check_tensor_parallel(model, 4, tp_plan) == 3
    assert check_tensor_parallel(model, 1, tp_plan) == 0
    odd = torch.nn.Sequential(*gpt_layers(GPTConfig(dim=12, heads=3, layers=1)))
    with pytest.raises(ConfigError, match="tp=2 does not divide the 3 attention heads"):
        check_tensor_parallel(odd, 2, tp_plan)
    with pytest.raises(ConfigError, match="1-D DeviceMesh"):
        apply_tensor_parallel(model, "tp", tp_plan)


def _llama(heads: int, kv_heads: int) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
    )
    model: torch.nn.Module = transformers.LlamaModel(config)
    return model


def test_check_llama_heads_and_kv_heads() -> None:
    assert check_tensor_parallel(_llama(4, 2), 2, llama_plan) == 2
    with pytest.raises(ConfigError, match=r"the 6 attention heads.*num_attention_heads"):
        check_tensor_parallel(_llama(6, 2), 4, llama_plan)
    with pytest.raises(ConfigError, match="tp=2 does not divide the 1 key/value heads"):
        check_tensor_parallel(_llama(4, 1), 2, llama_plan)


def test_unrecognised_blocks_are_refused() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    with pytest.raises(ConfigError, match=r"not supported for GPT-2.*use tp=1"):
        check_tensor_parallel(transformers.GPT2Model(config), 2, known_blocks_plan)
    layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32)
    with pytest.raises(ConfigError, match="not supported for TransformerEncoderLayer"):
        check_tensor_parallel(torch.nn.Sequential(layer), 2, known_blocks_plan)


def _no_problems(results: list[dict[str, list[str]]], names: list[str]) -> None:
    for name in names:
        problems = [line for per_rank in results for line in per_rank[name]]
        assert not problems, "\n".join(problems[:10])


@pytest.mark.multiproc
@pytest.mark.timeout(150)
def test_pp2_tp2_equals_one_process() -> None:
    # One launch also checks Llama decoder layers sharded over each tp group (pp=1, tp=2):
    # output, input gradient and every parameter gradient against the unsharded copy.
    pytest.importorskip("transformers")
    names = ["1f1b", "zb-h1"]
    results = launch(check_mesh_rank, 4, (Mesh(pp=2, tp=2), names, False, True), timeout=130)
    assert len(results) == 4
    _no_problems(results, [*names, "llama"])


@pytest.mark.multiproc
@pytest.mark.timeout(150)
def test_pp2_dp2_tp2_equals_one_process() -> None:
    # dp averaging of DTensor gradients both ways: after the step (1f1b) and overlapped with
    # it, as train runs it (interleaved-1f1b).
    names = ["1f1b", "interleaved-1f1b"]
    spec = Mesh(pp=2, dp=2, tp=2)
    results = launch(check_mesh_rank, 8, (spec, names, ["interleaved-1f1b"]), timeout=130)
    assert len(results) == 8
    _no_problems(results, names)


@pytest.mark.multiproc
@pytest.mark.timeout(150)
def test_pp2_fsdp2_equals_one_process() -> None:
    # FSDP2 over dp: weights, gradients and optimizer state sharded; no averaging call.
    names = ["1f1b", "interleaved-1f1b"]
    spec = Mesh(pp=2, dp=2, dp_shard=True)
    results = launch(check_mesh_rank, 4, (spec, names), timeout=130)
    assert len(results) == 4
    _no_problems(results, names)


def test_tensor_parallel_over_a_model_without_blocks_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pathlib import Path

    from stagewise.runconfig import BatchConfig, ModelConfig, RunConfig, ScheduleConfig
    from stagewise.train import prepare

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    with pytest.raises(ConfigError, match=r"tp=2 but model .*no block.*use tp=1"):
        prepare(RunConfig(mesh=Mesh(pp=2, dp=1, tp=2), schedule=ScheduleConfig(num_microbatches=2),
                          batch=BatchConfig(global_batch=4),
                          model=ModelConfig("py:test_runtime_hf:toy_lm",
                                            split=("embed", "blocks", "head"))))
