"""Memory formulas against hand-computed values (Korthikanti et al. 2022, Megatron's 18 bytes)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from stagewise.plan import (
    Cluster,
    ParallelConfig,
    TrainingSpec,
    evaluate,
    get_gpu,
    get_model,
    layer_activation_bytes,
)
from stagewise.plan.memory import GIB, lora_params_per_block

GPT22 = get_model("gpt-22b")
S, B, H, A, T = 2048, 4, 6144, 64, 8
SBH = S * B * H
UNFUSED = TrainingSpec(seq_len=S, global_batch=4, attention="unfused")


def _cfg(**kw: object) -> ParallelConfig:
    base: dict[str, object] = {"tp": T, "pp": 1, "dp": 1, "micro_batch_size": B}
    base.update(kw)
    return ParallelConfig.of(**base)  # type: ignore[arg-type]


def test_gpt_block_activations_match_korthikanti_table_2() -> None:
    # No parallelism at all: sbh(34 + 5as/h).
    one = ParallelConfig.of(tp=1, pp=1, dp=1, micro_batch_size=B)
    assert layer_activation_bytes(GPT22, UNFUSED, one) == pytest.approx(SBH * (34 + 5 * A * S / H))
    # TP only: sbh(10 + 24/t + 5as/(ht)).
    expected = SBH * (10 + 24 / T + 5 * A * S / (H * T))
    assert layer_activation_bytes(GPT22, UNFUSED, _cfg()) == pytest.approx(expected)
    # TP + sequence parallel + selective recompute: 34 sbh / t.
    sel = _cfg(sequence_parallel=True, recompute="selective")
    assert layer_activation_bytes(GPT22, UNFUSED, sel) == pytest.approx(34 * SBH / T)
    # Full recompute keeps the block input: 2 sbh (sharded with SP).
    assert layer_activation_bytes(GPT22, UNFUSED, _cfg(recompute="full")) == 2 * SBH
    full_sp = _cfg(recompute="full", sequence_parallel=True)
    assert layer_activation_bytes(GPT22, UNFUSED, full_sp) == 2 * SBH / T


def test_llama_block_without_dropout_with_flash_attention() -> None:
    llama = get_model("llama-2-70b")
    run = TrainingSpec(seq_len=4096, global_batch=8)
    cfg = ParallelConfig.of(tp=8, pp=1, dp=1, micro_batch_size=1, sequence_parallel=True)
    s, h, f, k, a = 4096, 8192, 28672, 1024, 64
    # norms 8sbh + Q 2sbh + K,V 4sbk + out 2sbh + SwiGLU 6sbf + fp32 log-sum-exp 4as, all / t
    expected = (8 * s * h + 2 * s * h + 4 * s * k + 2 * s * h + 6 * s * f + 4 * a * s) / 8
    assert layer_activation_bytes(llama, run, cfg) == pytest.approx(expected)


def test_calibration_case_22b_model_states_are_18_bytes_per_parameter() -> None:
    cluster = Cluster(get_gpu("a100-80gb"), 1, 8)
    plan = evaluate(GPT22, cluster, UNFUSED, _cfg())
    on_gpu = GPT22.layers * GPT22.layer_params / T + GPT22.embedding_params(T) / T
    assert plan.memory.model_states == pytest.approx(18 * on_gpu)
    # Fig. 1 of the paper (blocks only, 18 bytes x 12h^2 L / t): 45.56 GiB; embeddings add ~1.5 %.
    assert plan.memory.model_states / GIB == pytest.approx(45.5625, rel=0.02)
    # No pipeline: every layer's activations are alive at the peak.
    assert plan.memory.activations >= 48 * layer_activation_bytes(GPT22, UNFUSED, _cfg())


def test_distributed_optimizer_is_6_plus_12_over_d_bytes() -> None:
    model = get_model("llama-2-7b")
    cluster = Cluster(get_gpu("h100"), 1, 8)
    run = TrainingSpec(seq_len=2048, global_batch=8)
    plain = evaluate(model, cluster, run, ParallelConfig.of(tp=1, pp=1, dp=8))
    sharded = evaluate(model, cluster, run, ParallelConfig.of(tp=1, pp=1, dp=8,
                                                           dp_sharding="optimizer"))
    params = plain.memory.weights / 2
    assert plain.memory.gradients == pytest.approx(4 * params)
    assert plain.memory.optimizer == pytest.approx(12 * params)
    assert sharded.memory.optimizer == pytest.approx(12 * params / 8)


def test_interleaving_keeps_p_times_1_plus_p_minus_1_over_pv_microbatches() -> None:
    # Korthikanti eq. (175B row of the calibration): rank 0 holds p(1 + (p-1)/(pv)) stage units.
    gpt = get_model("gpt-3-175b")
    cluster = Cluster(get_gpu("a100-80gb"), 8, 8)
    run = TrainingSpec(seq_len=2048, global_batch=64, attention="unfused")
    cfg = ParallelConfig.of(tp=8, pp=8, dp=1, num_chunks=3, micro_batch_size=1,
                         schedule="interleaved-1f1b")
    plan = evaluate(gpt, cluster, run, cfg)
    per_layer = layer_activation_bytes(gpt, run, cfg)
    units = 8 * (1 + 7 / 24)
    blocks = units * 96 / 8 * per_layer
    assert plan.memory.rank == 0
    # Stage 0 also holds the embedding dropout mask, s·b·h bytes for each of its micro-batches
    # in flight (at most (v-1)·p + 2(p-1) + 1 = 31 of them on rank 0).
    assert blocks <= plan.memory.activations <= blocks + 31 * 2048 * 12288
    assert plan.memory.activations / GIB == pytest.approx(66.84, rel=0.03)


def test_one_f_one_b_holds_fewer_microbatches_than_gpipe() -> None:
    model = get_model("llama-2-7b")
    cluster = Cluster(get_gpu("h100"), 1, 8)
    run = TrainingSpec(seq_len=2048, global_batch=32)
    gpipe = evaluate(model, cluster, run, ParallelConfig.of(tp=1, pp=4, dp=2, schedule="gpipe"))
    ofob = evaluate(model, cluster, run, ParallelConfig.of(tp=1, pp=4, dp=2, schedule="1f1b"))
    per_stage = 8 * layer_activation_bytes(model, run, ofob.config)
    assert gpipe.memory.activations >= 16 * per_stage  # all m = 16 micro-batches
    assert ofob.memory.activations < 5 * per_stage  # p = 4 in flight on rank 0


def test_lora_freezes_the_base_and_trains_only_adapters() -> None:
    model = get_model("llama-2-70b")
    cluster = Cluster(get_gpu("h100"), 1, 8)
    run = TrainingSpec(seq_len=4096, global_batch=8, mode="lora", lora_rank=16)
    plan = evaluate(model, cluster, run, ParallelConfig.of(tp=8, pp=1, dp=1))
    h, k, f = 8192, 1024, 28672
    per_block = 16 * ((h + h) + 2 * (h + k) + (h + h) + 2 * (h + f) + (f + h))
    assert lora_params_per_block(model, 16) == per_block
    adapters = 80 * per_block / 8
    # fp32 adapters (their own master copy): fp32 gradients and AdamW's two fp32 moments.
    assert plan.memory.gradients == pytest.approx(4 * adapters)
    assert plan.memory.optimizer == pytest.approx(8 * adapters)
    assert plan.memory.weights / GIB == pytest.approx(2 * model.num_params / 8 / GIB, rel=0.02)
    base = plan.memory.weights - 4 * adapters
    assert base / GIB == pytest.approx(2 * model.num_params / 8 / GIB, rel=0.02)
    assert plan.fits


def test_tied_embeddings_put_a_head_copy_on_the_last_stage() -> None:
    gpt = get_model("gpt-22b")
    cluster = Cluster(get_gpu("a100-80gb"), 1, 8)
    run = TrainingSpec(seq_len=2048, global_batch=8, attention="unfused")
    plan = evaluate(gpt, cluster, run, ParallelConfig.of(tp=1, pp=2, dp=4))
    assert plan.memory.rank in (0, 1)
    embed = gpt.padded_vocab(1) * gpt.hidden
    # Both ranks hold 24 blocks; rank 0 the embedding (+ positions), rank 1 a copy for the head.
    assert plan.memory.weights >= 2 * (24 * gpt.layer_params + embed)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "zb-h1",
                                  "zb-h2", "zb-v", "dualpipev"])
def test_cached_peak_equals_the_simulated_timelines_peak(name: str) -> None:
    from stagewise.plan import PipelineCache
    from stagewise.schedules import build, get
    from stagewise.sim import simulate

    v = get(name).fixed_chunks or 3
    p, m = 4, 12
    schedule = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
    stage_bytes = [1.0 + 0.37 * ((7 * s) % 5) for s in range(schedule.num_stages)]
    timeline = simulate(schedule)
    cache = PipelineCache()
    for rank in range(p):
        expected = replace(timeline, activation_bytes=tuple(stage_bytes)).peak_activations(
            rank, in_bytes=True)
        assert cache.peak_activation_bytes(name, p, m, v, rank, stage_bytes) == pytest.approx(
            expected)


@pytest.mark.parametrize("attention", ["flash", "unfused"])
def test_lora_block_activations_by_hand(attention: str) -> None:
    # Llama 2 7B, LoRA r=16 on all seven projections, as peft on a Hugging Face block saves
    # them under bf16 autocast (tests/test_plan_lora_memory_fit.py measures a real block).
    model = get_model("llama-2-7b")
    s, b, h, f, a, d, r = 4096, 1, 4096, 11008, 32, 128, 16
    sbh, sbf, sb = s * b * h, s * b * f, s * b
    run = TrainingSpec(seq_len=s, global_batch=1, mode="lora", lora_rank=r, attention=attention)
    cfg = ParallelConfig.of(tp=1, pp=1, dp=1, micro_batch_size=b)
    norms = 2 * (4 * sbh + 4 * sb)  # fp32 input and 1/rms of both RMSNorms
    inputs = 6 * 2 * sbh + 2 * sbf  # a bf16 input copy per adapter: q k v o gate up, down
    adapters = 7 * 2 * sb * r  # A x of each adapter
    casts = 2 * r * (4 * (h + h) + 3 * (h + f))  # bf16 casts of every A and B (kv = h here)
    mlp = 3 * 2 * sbf  # gate, SiLU(gate), up
    rotary = 2 * 2 * sb * d  # cos and sin
    if attention == "flash":
        core = 2 * sbh + 2 * 2 * sbh + 2 * sbh + 4 * a * sb  # Q, K, V, out, fp32 log-sum-exp
    else:
        core = 3 * 2 * sbh + (4 + 2) * a * s * s * b  # Q, K, V; fp32 softmax and bf16 copy
    expected = norms + inputs + adapters + casts + mlp + rotary + core
    assert layer_activation_bytes(model, run, cfg) == pytest.approx(expected, rel=1e-12)
    # The block as full training saves it (Megatron's fused kernels) is smaller.
    full = replace(run, mode="full")
    assert layer_activation_bytes(model, full, cfg) < 0.75 * expected


def test_lora_first_stage_skips_the_first_norm_and_the_last_keeps_the_final_norm() -> None:
    from stagewise.plan.rank import rank_sizes

    model = get_model("llama-2-7b")
    s, h = 4096, 4096
    run = TrainingSpec(seq_len=s, global_batch=1, mode="lora")
    cfg = ParallelConfig.of(tp=1, pp=2, dp=1, micro_batch_size=1)
    block = layer_activation_bytes(model, run, cfg)
    stage_bytes = rank_sizes(model, run, cfg, (16, 16), [(0,), (1,)])[0].stage_bytes
    # The frozen embedding's output needs no gradient: the first block's first RMSNorm saves
    # neither its fp32 input nor 1/rms. The last stage adds the final norm's input and output.
    assert stage_bytes[0] == pytest.approx(16 * block - (4 * s * h + 4 * s))
    assert stage_bytes[1] == pytest.approx(16 * block + 4 * s * h)


def test_fp8_flash_block_keeps_the_kernels_bf16_output_and_the_projections_fp8_copy() -> None:
    # Llama 2 70B, TP=8 with sequence parallelism, FP8, flash attention, counted by hand:
    # norms' inputs (2 bytes) and outputs (1 byte, FP8), sharded by SP; Q (2), K and V (2 each,
    # kv width); the attention output as flash's bf16 output (2) and the projection's FP8
    # copy (1); gate and up (2 each) and the FP8 product (1); flash's fp32 log-sum-exp.
    model = get_model("llama-2-70b")
    s, b, t = 4096, 1, 8
    h, k, f, a = model.hidden, model.kv_dim, model.ffn, model.heads
    run = TrainingSpec(seq_len=s, global_batch=8, precision="fp8")
    cfg = ParallelConfig.of(tp=t, pp=1, dp=1, sequence_parallel=True)
    norms = 2 * (2 + 1) * s * b * h / t
    attention = (2 * s * b * h + 2 * 2 * s * b * k + (2 + 1) * s * b * h + 4 * a * s * b) / t
    mlp = (2 + 2 + 1) * s * b * f / t
    assert layer_activation_bytes(model, run, cfg) == pytest.approx(norms + attention + mlp)
