"""DeepSpeed's pipeline engine (``TrainingSpec.engine``) and a cluster's own network.

Each difference from the Megatron engine is checked against the term it adds, computed here
from the hardware figures: the blocking sends, the bf16 optimizer's gradient copy, the DP
reduction after the last backward, the refused schedules and sharding.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from stagewise.errors import PlanError
from stagewise.plan import (
    DEFAULT_CONSTANTS,
    Cluster,
    ModelSpec,
    ParallelConfig,
    TrainingSpec,
    evaluate,
    get_gpu,
    search,
)
from stagewise.plan.comm import all_gather_time, all_reduce_time
from stagewise.plan.memory import layer_state_bytes_per_param
from stagewise.plan.spec import stage_layers
from stagewise.plan.steptime import StageProfile, stage_profile

A100 = get_gpu("a100-80gb")
C = DEFAULT_CONSTANTS
MODEL = ModelSpec(name="gpt-small", layers=8, hidden=1024, heads=16, kv_heads=16, ffn=4096,
                  vocab=50304, mlp="gelu", norm="layernorm", tied_embeddings=True,
                  position="alibi", bias=True, max_seq_len=2048)


def _profiles(
    cluster: Cluster, config: ParallelConfig, seq: int = 2048, batch: int = 16
) -> list[StageProfile]:
    out = []
    for engine in ("megatron", "deepspeed"):
        run = TrainingSpec(seq_len=seq, global_batch=batch, attention="unfused", engine=engine)
        layers = stage_layers(MODEL.layers, config.pp)
        placement = tuple(range(config.pp))
        out.append(stage_profile(MODEL, cluster, run, config, layers, placement, C))
    return out


def test_the_bf16_optimizer_copies_every_gradient_once_per_micro_batch() -> None:
    cluster = Cluster(A100, 1, 1)
    config = ParallelConfig.of(tp=1, pp=1, dp=1, micro_batch_size=2)
    megatron, deepspeed = _profiles(cluster, config)
    # one stage holds every parameter; the cast reads 2 bytes and writes 4, the add reads
    # 4 + 4 and writes 4: 18 bytes per parameter over HBM, plus one launch
    params = MODEL.layers * MODEL.layer_params + MODEL.embedding_params() + MODEL.head_params()
    copy = 18 * params / (A100.hbm_bandwidth * C.hbm_efficiency) + C.kernel_overhead_s
    assert deepspeed.backward[0] - megatron.backward[0] == pytest.approx(copy, rel=1e-9)
    assert deepspeed.forward == megatron.forward  # nothing to send on one stage


def test_deepspeed_sends_block_the_sender_both_ways() -> None:
    cluster = Cluster(A100, 2, 1).with_node_network(100)  # 12.5 GB/s per GPU between nodes
    config = ParallelConfig.of(tp=1, pp=2, dp=1, micro_batch_size=2)
    megatron, deepspeed = _profiles(cluster, config)
    activation = 2 * 2 * 2048 * MODEL.hidden  # bf16, b x s x h
    send = C.p2p_latency_s + activation / (100e9 / 8 * C.link_efficiency)
    assert megatron.hops[0] == pytest.approx(send, rel=1e-9)  # the receiver waits for it
    # DeepSpeed's send blocks the sender until the data is there: the sender pays it, the
    # receiver waits for nothing more (no TP shares to gather at TP = 1)
    assert deepspeed.hops == [0.0, 0.0]
    assert deepspeed.forward[0] - megatron.forward[0] == pytest.approx(send, rel=1e-9)
    assert deepspeed.forward[1] == megatron.forward[1]  # the last stage sends no activation
    copy_1 = deepspeed.backward[1] - megatron.backward[1] - send  # the input gradient's send
    hbm = A100.hbm_bandwidth * C.hbm_efficiency
    stage_1 = 4 * MODEL.layer_params + MODEL.head_params() + MODEL.padded_vocab() * 1024
    assert copy_1 == pytest.approx(18 * stage_1 / hbm + C.kernel_overhead_s, rel=1e-9)


def test_deepspeed_gathers_its_own_partitioned_output_before_the_backward() -> None:
    cluster = Cluster(A100, 2, 2)
    config = ParallelConfig.of(tp=2, pp=2, dp=1, micro_batch_size=2)
    megatron, deepspeed = _profiles(cluster, config)
    activation = 2 * 2 * 2048 * MODEL.hidden
    gather = all_gather_time(activation, 2, A100.nvlink_bandwidth, C)
    send = C.p2p_latency_s + activation / 2 / (A100.network_bandwidth * C.link_efficiency)
    assert megatron.hops[0] == pytest.approx(send + gather, rel=1e-9)
    assert deepspeed.hops[0] == pytest.approx(gather, rel=1e-9)
    hbm = A100.hbm_bandwidth * C.hbm_efficiency
    stage_0 = (4 * MODEL.layer_params + MODEL.embedding_params(2)) / 2
    extra = deepspeed.backward[0] - megatron.backward[0]
    assert extra == pytest.approx(gather + 18 * stage_0 / hbm + C.kernel_overhead_s, rel=1e-9)


def test_deepspeed_reduces_after_the_backward_and_all_reduces_its_fp32_buffer() -> None:
    cluster = Cluster(A100, 2, 8)
    config = ParallelConfig.of(tp=1, pp=2, dp=8, micro_batch_size=1,
                               dp_sharding="optimizer")
    overlapped = TrainingSpec(seq_len=2048, global_batch=64)
    deepspeed = replace(overlapped, engine="deepspeed")
    plan = evaluate(MODEL, cluster, deepspeed, config)
    megatron = evaluate(MODEL, cluster, overlapped, config)
    # the DP group of 8 is one node's NVLink; the last stage's rank holds the most
    stage_1 = 4 * MODEL.layer_params + MODEL.head_params() + MODEL.padded_vocab() * 1024
    reduce = all_reduce_time(4 * stage_1, 8, A100.nvlink_bandwidth, C)
    gather = all_gather_time(2 * stage_1, 8, A100.nvlink_bandwidth, C)
    assert plan.time.dp_exposed_s == pytest.approx(reduce + gather, rel=1e-9)
    assert megatron.time.dp_exposed_s < plan.time.dp_exposed_s
    # memory: the bf16 gradients beside the unsharded fp32 buffer
    weights, grads, _ = layer_state_bytes_per_param(deepspeed, config)
    assert (weights, grads) == (2.0, 6.0)
    assert layer_state_bytes_per_param(overlapped, config)[1] == 4.0


def test_deepspeed_runs_only_its_1f1b_and_no_zero_2_with_a_pipeline() -> None:
    cluster = Cluster(A100, 2, 8)
    run = TrainingSpec(seq_len=2048, global_batch=64, engine="deepspeed")
    with pytest.raises(PlanError, match="only 1F1B"):
        evaluate(MODEL, cluster, run, ParallelConfig.of(
            tp=1, pp=2, dp=8, num_chunks=2, schedule="interleaved-1f1b"))
    with pytest.raises(PlanError, match="ZeRO-2 and ZeRO-3"):
        evaluate(MODEL, cluster, run, ParallelConfig.of(tp=1, pp=2, dp=8,
                                                          dp_sharding="gradients"))
    result = search(MODEL, cluster, run, {"pp": 4})
    assert result.plans
    assert {(p.config.schedule, p.config.num_chunks) for p in result.plans} == {("1f1b", 1)}
    with pytest.raises(PlanError, match="engine must be one of"):
        TrainingSpec(seq_len=2048, global_batch=64, engine="colossal")


def test_a_node_network_is_shared_by_its_gpus_and_must_be_positive() -> None:
    cluster = Cluster(A100, 4, 8).with_node_network(400)
    assert cluster.gpu.network_bandwidth == pytest.approx(400e9 / 8 / 8)
    assert cluster.node_network_gbps == pytest.approx(400)
    assert Cluster(A100, 4, 8).node_network_gbps == pytest.approx(1600)  # 8 x 200 Gb/s
    for bad in (0, -1, float("inf"), float("nan"), True):
        with pytest.raises(PlanError, match="Gbit/s"):
            Cluster(A100, 4, 8).with_node_network(bad)


def _plan_cli(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stagewise", "plan", "--model", "llama-2-7b", "--gpu", "a100",
         "--gpus", "16", "--seq-len", "4096", "--global-batch", "64", "--top", "1", *flags],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_the_cli_takes_a_node_network_and_an_engine() -> None:
    slow = _plan_cli("--node-network-gbps", "100", "--pp", "2", "--tp", "8")
    fast = _plan_cli("--pp", "2", "--tp", "8")
    assert slow.returncode == 0, slow.stderr
    assert fast.returncode == 0, fast.stderr
    assert "100 Gb/s per node" in slow.stdout
    assert "1600 Gb/s per node" in fast.stdout
    deepspeed = _plan_cli("--engine", "deepspeed", "--pp", "2", "--tp", "8")
    assert deepspeed.returncode == 0, deepspeed.stderr
    assert " 1f1b " in deepspeed.stdout
    # the header names how the DP reduction and the attention are timed, so a published run's
    # own settings can be checked against it
    assert "DP reduction overlapped with the backward" in fast.stdout
    assert "flash attention" in fast.stdout
    assert "DP reduction after the last backward (the engine's)" in deepspeed.stdout
    exposed = _plan_cli("--pp", "2", "--tp", "8", "--no-dp-overlap", "--attention", "unfused")
    assert "DP reduction after the last backward, unfused attention" in exposed.stdout
    bad = _plan_cli("--node-network-gbps", "-5")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "--node-network-gbps" in bad.stderr
    refused = _plan_cli("--engine", "deepspeed", "--schedule", "interleaved-1f1b",
                        "--num-chunks", "2", "--pp", "2")
    assert refused.returncode == 2
    assert "only 1F1B" in refused.stderr


def test_what_would_fit_keeps_the_constants_and_the_network() -> None:
    from stagewise.plan import get_model
    from stagewise.plan.advice import what_would_fit

    model = get_model("llama-2-70b")
    cluster = Cluster(get_gpu("a100-40gb"), 1, 8).with_node_network(100)
    run = TrainingSpec(seq_len=4096, global_batch=64)
    constants = replace(C, tp_overlap="none")
    suggestions = what_would_fit(model, cluster, run, constants)
    assert suggestions
    for suggestion in suggestions:
        plan = suggestion.plan
        assert plan.cluster.node_network_gbps == pytest.approx(100)
        again = evaluate(model, plan.cluster, plan.training, plan.config, constants)
        assert plan.time.step_s == pytest.approx(again.time.step_s, rel=1e-9)
    assert any(s.plan.cluster.gpu.name != cluster.gpu.name for s in suggestions)


def test_model_flags_and_the_tp_overlap_reach_the_plan() -> None:
    import json

    shape = ["--layers", "8", "--hidden", "1024", "--heads", "16", "--ffn", "4096",
             "--vocab", "50304", "--mlp", "gelu", "--tied-embeddings"]
    fixed = ["--tp", "8", "--pp", "1", "--micro-batch-size", "4", "--recompute", "none",
             "--no-sequence-parallel", "--attention", "unfused"]

    def plan(*flags: str) -> dict[str, object]:
        done = subprocess.run(
            [sys.executable, "-m", "stagewise", "plan", *shape, "--gpu", "a100", "--gpus", "8",
             "--seq-len", "2048", "--global-batch", "32", "--json", *fixed, *flags],
            capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        document: dict[str, object] = json.loads(done.stdout)
        return document

    plain = plan()
    assert plain["num_params"] == ModelSpec(
        name="x", layers=8, hidden=1024, heads=16, kv_heads=16, ffn=4096, vocab=50304,
        mlp="gelu", norm="layernorm", tied_embeddings=True, position="learned",
        max_seq_len=2048).num_params
    bloomish = plan("--position", "alibi", "--bias", "--dropout")
    assert bloomish["num_params"] == ModelSpec(
        name="x", layers=8, hidden=1024, heads=16, kv_heads=16, ffn=4096, vocab=50304,
        mlp="gelu", norm="layernorm", tied_embeddings=True, position="alibi", bias=True,
        dropout=True, max_seq_len=2048).num_params
    steps = {}
    for overlap in ("none", "backward"):
        document = plan("--tp-overlap", overlap)
        assert document["tp_overlap"] == overlap
        steps[overlap] = document["recommended"]["step_time_s"]  # type: ignore[index]
    assert steps["none"] > steps["backward"]  # TP 8: the backward all-reduces are exposed
    deepspeed = plan("--engine", "deepspeed")
    assert (deepspeed["engine"], deepspeed["tp_overlap"]) == ("deepspeed", "none")
    assert plan()["node_network_gbps"] == pytest.approx(1600)


def test_deepspeed_refuses_other_schedules_at_any_depth_and_emitted_runs_keep_dropout(
    tmp_path: object,
) -> None:
    from pathlib import Path

    cluster = Cluster(A100, 1, 8)
    run = TrainingSpec(seq_len=2048, global_batch=64, engine="deepspeed")
    with pytest.raises(PlanError, match="only 1F1B"):
        evaluate(MODEL, cluster, run, ParallelConfig.of(tp=1, pp=1, dp=8, schedule="gpipe",
                                                          dp_sharding="optimizer"))
    out = Path(str(tmp_path)) / "run.toml"
    done = subprocess.run(
        [sys.executable, "-m", "stagewise", "plan", "--model", "tiny-llama", "--gpu", "cpu",
         "--gpus", "4", "--seq-len", "32", "--global-batch", "8", "--pp", "2", "--tp", "2",
         "--attention", "unfused", "--dropout", "--emit-config", str(out)],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "attention_dropout = 0.1" in out.read_text()


def test_a_reader_that_stops_early_ends_the_output_quietly() -> None:
    shell = (f"{sys.executable} -m stagewise plan --model llama-2-7b --gpu a100 --gpus 16 "
             "--seq-len 4096 --global-batch 64 | head -c 10")
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {shell}"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert len(done.stdout) == 10
    assert "Traceback" not in done.stderr


def test_a_pytorch_stack_casts_fp8_weights_every_micro_batch() -> None:
    # Transformer Engine modules called without is_first_microbatch (a PyTorch stack) cast each
    # linear's bf16 weight to FP8 and its transpose every forward: read 2, write 1 + 1 bytes
    # per weight of the TP shard, four launches per block; Megatron-LM casts once per step.
    h100 = get_gpu("h100")
    cluster, config = Cluster(h100, 1, 8), ParallelConfig.of(tp=2, pp=2, dp=2,
                                                             micro_batch_size=1)
    layers, placement = stage_layers(MODEL.layers, 2), (0, 1)
    profiles = {}
    for engine in ("megatron", "pytorch"):
        run = TrainingSpec(seq_len=2048, global_batch=8, precision="fp8", engine=engine)
        profiles[engine] = stage_profile(MODEL, cluster, run, config, layers, placement, C)
    megatron, pytorch = profiles["megatron"], profiles["pytorch"]
    weights = MODEL.layer_matmul_params / 2  # one GPU's half of the block's matrices
    cast = 4 * weights / (h100.hbm_bandwidth * C.hbm_efficiency) + 4 * C.kernel_overhead_s
    # the first stage: its blocks and the embedding (the engines' losses differ on the last)
    assert pytorch.forward[0] - megatron.forward[0] == pytest.approx(layers[0] * cast, rel=1e-9)
    bf16 = TrainingSpec(seq_len=2048, global_batch=8, engine="pytorch")
    plain = stage_profile(MODEL, cluster, bf16, config, layers, placement, C)
    same = TrainingSpec(seq_len=2048, global_batch=8, engine="megatron")
    assert plain.forward[0] == stage_profile(MODEL, cluster, same, config, layers, placement,
                                             C).forward[0]
