"""The kernel model (tiles, waves, split-K, roofline) and FP8 in time and memory."""

from __future__ import annotations

import pytest

from stagewise.errors import PlanError
from stagewise.plan import (
    DEFAULT_CONSTANTS,
    Cluster,
    ParallelConfig,
    TrainingSpec,
    evaluate,
    get_gpu,
    get_model,
    layer_time,
)
from stagewise.plan.hardware import UNMEASURED_GEMM_SHARE, catalog_gpus
from stagewise.plan.kernels import attention_waves, elementwise_time, gemm_time
from stagewise.plan.layer import LayerSetup, block_time, elementwise_bytes
from stagewise.plan.memory import layer_activation_bytes

H100 = get_gpu("h100")
A100 = get_gpu("a100")
C = DEFAULT_CONSTANTS


def test_one_tile_more_than_the_sms_costs_a_second_wave() -> None:
    # 132 tiles fill H100's 132 SMs once; 133 need a second wave of (nearly) the same length.
    k = 8192
    full = gemm_time(12 * 128, 11 * 128, k, H100, C)
    spill = gemm_time(12 * 128 + 1, 11 * 128, k, H100, C)
    assert spill - C.kernel_overhead_s == pytest.approx(2 * (full - C.kernel_overhead_s))


def test_few_tiles_split_k_over_the_idle_sms() -> None:
    # One 128 x 128 tile with K = 65536: split over 132 SMs it runs far faster than one SM
    # would, and still no faster than its bytes allow.
    k = 65536
    t = gemm_time(128, 128, k, H100, C)
    one_sm = 2 * 128 * 128 * k / (H100.gemm_flops * C.matmul_efficiency / H100.sms) + (
        C.tile_overhead_s)
    assert t < one_sm / 10
    bytes_moved = 2 * (128 * k * 2) + 2 * 128 * 128
    assert t >= bytes_moved / (H100.hbm_bandwidth * C.hbm_efficiency)


def test_small_gemms_are_slower_per_flop_and_tiny_ones_memory_bound() -> None:
    def efficiency(m: int, n: int, k: int) -> float:
        return 2 * m * n * k / gemm_time(m, n, k, H100, C) / H100.peak_flops

    big = efficiency(8192, 8192, 8192)
    assert big < C.matmul_efficiency * 794.5 / 989.4  # a share of the measured rate
    assert big > efficiency(8192, 1024, 1024) > efficiency(2048, 512, 512)
    # 16 tokens x 8192 x 8192 reads the 128 MiB weight: bound by HBM, not FLOPs. Its 64 tiles
    # are split in K over 2 x 64 SMs, whose fp32 partial sums are written and read back.
    moved = 2 * 8192 * 8192 + 2 * 16 * 8192 * 2 + 2 * 4 * 16 * 8192 * 2
    assert gemm_time(16, 8192, 8192, H100, C) == pytest.approx(
        moved / (H100.hbm_bandwidth * C.hbm_efficiency) + C.kernel_overhead_s, rel=1e-6)


def test_elementwise_is_bytes_over_bandwidth_plus_launches() -> None:
    assert elementwise_time(1e9, 3, A100, C) == pytest.approx(
        1e9 / (2.039e12 * C.hbm_efficiency) + 3 * C.kernel_overhead_s)


def test_attention_waves_quantise_to_whole_waves() -> None:
    assert attention_waves(132, H100) == pytest.approx(1.0)
    assert attention_waves(133, H100) == pytest.approx(264 / 133)


def test_fp8_gemm_runs_at_its_efficiency_of_the_measured_fp8_rate() -> None:
    big = (8192, 8192, 8192)
    ratio = (gemm_time(*big, H100, C) - C.kernel_overhead_s) / (
        gemm_time(*big, H100, C, fp8=True) - C.kernel_overhead_s)
    # MAMF table: FP8 1402.6 vs BF16 794.5 TFLOP/s on H100 SXM (1.77x, not the peaks' 2x);
    # only the K loop speeds up: each tile's fill and bf16 write-out (tile_overhead_s) take
    # the same time in both.
    per_sm = 794.5e12 * H100.sustained_share * C.matmul_efficiency / H100.sms
    loop, over = 2 * 128 * 128 * 8192 / per_sm, C.tile_overhead_s
    speedup = 1402.6 / 794.5 * C.fp8_efficiency
    assert ratio == pytest.approx((loop + over) / (loop / speedup + over))
    assert ratio < speedup < H100.fp8_peak_flops / H100.peak_flops


def test_every_catalog_gpu_has_an_achievable_gemm_rate_below_its_peak_with_a_source() -> None:
    for name in catalog_gpus():
        gpu = get_gpu(name)
        assert gpu.gemm_source
        assert 0.5 * gpu.peak_flops < gpu.achievable_gemm_flops() < gpu.peak_flops
        if gpu.has_fp8:
            rate = gpu.achievable_gemm_flops(fp8=True)
            assert 0.5 * gpu.fp8_peak_flops < rate < gpu.fp8_peak_flops
    # measured where published, else UNMEASURED_GEMM_SHARE of the peak, said so
    assert get_gpu("a100").gemm_flops == pytest.approx(271.2e12)
    v100 = get_gpu("v100")
    assert v100.gemm_flops == 0.0
    assert "not measured" in v100.gemm_source
    assert v100.achievable_gemm_flops() == pytest.approx(UNMEASURED_GEMM_SHARE * 125e12)


def test_fp8_is_refused_on_a_gpu_without_fp8_tensor_cores() -> None:
    with pytest.raises(PlanError, match="A100-SXM4-80GB has no FP8 tensor cores"):
        gemm_time(1024, 1024, 1024, A100, C, fp8=True)
    with pytest.raises(PlanError, match="no FP8 tensor cores: use --precision bf16"):
        layer_time("llama-2-7b", "a100", 1, 1, 4096, precision="fp8")
    run = TrainingSpec(seq_len=4096, global_batch=8, precision="fp8")
    with pytest.raises(PlanError, match="no FP8"):
        evaluate(get_model("llama-2-7b"), Cluster(A100, 1, 8), run,
                 ParallelConfig.of(tp=1, pp=1, dp=8))
    for name in ("h100", "h200", "b200"):
        assert get_gpu(name).has_fp8


def test_fp8_block_is_faster_but_not_twice_and_keeps_casts() -> None:
    bf16 = layer_time("llama-2-70b", "h100", 8, 1, 4096, include_comm=False)
    fp8 = layer_time("llama-2-70b", "h100", 8, 1, 4096, include_comm=False, precision="fp8")
    for b, f in zip(bf16, fp8, strict=True):
        assert b / 2 < f < b  # attention and element-wise work stay bf16


def test_fp8_saves_gemm_inputs_in_one_byte_and_keeps_fp8_weight_copies() -> None:
    model = get_model("llama-2-7b")
    cfg = ParallelConfig.of(tp=1, pp=1, dp=8, micro_batch_size=1)
    bf16 = TrainingSpec(seq_len=4096, global_batch=8)
    fp8 = TrainingSpec(seq_len=4096, global_batch=8, precision="fp8")
    s, h, f = 4096, model.hidden, model.ffn
    saved = layer_activation_bytes(model, bf16, cfg) - layer_activation_bytes(model, fp8, cfg)
    # Two norm outputs and the MLP's last activation in one byte instead of two; the flash
    # kernel's bf16 output stays and the output projection adds its FP8 copy (+1 byte).
    assert saved == pytest.approx(2 * s * h - s * h + s * f)
    unfused = [TrainingSpec(seq_len=4096, global_batch=8, attention="unfused", precision=p)
               for p in ("bf16", "fp8")]
    saved = layer_activation_bytes(model, unfused[0], cfg) - layer_activation_bytes(
        model, unfused[1], cfg)
    assert saved == pytest.approx(2 * s * h + s * h + s * f)  # the projection's input only
    cluster = Cluster(H100, 1, 8)
    weights_bf16 = evaluate(model, cluster, bf16, cfg).memory.weights
    weights_fp8 = evaluate(model, cluster, fp8, cfg).memory.weights
    assert weights_fp8 - weights_bf16 == pytest.approx(2 * model.layers * model.layer_matmul_params)


def test_fp8_step_is_faster_on_h100() -> None:
    model = get_model("llama-2-7b")
    cluster = Cluster(H100, 1, 8)
    cfg = ParallelConfig.of(tp=1, pp=1, dp=8, micro_batch_size=1)
    bf16 = evaluate(model, cluster, TrainingSpec(seq_len=4096, global_batch=64), cfg)
    fp8 = evaluate(model, cluster, TrainingSpec(seq_len=4096, global_batch=64,
                                                precision="fp8"), cfg)
    assert 1.1 < bf16.time.step_s / fp8.time.step_s < 2.0


def test_elementwise_bytes_are_megatrons_fused_kernels_counted_by_hand() -> None:
    # Llama-2-7B (SwiGLU, RMSNorm, RoPE, no dropout), TP 2 without sequence parallelism,
    # 4096 tokens: h = 4096 replicated, f = 11008 / 2, q + kv = (4096 + 4096) / 2.
    llama = get_model("llama-2-7b")
    setup = LayerSetup(tp=2, micro_batch_size=1, seq_len=4096)
    h, f, qkv = 4096, 5504, 4096
    forward = 2 * 4 * h + 2 * 6 * h + 6 * f + 4 * qkv  # norms, residuals, SwiGLU, rotary
    backward = 2 * 6 * h + 2 * 6 * h + 10 * f + 4 * qkv
    assert elementwise_bytes(llama, setup) == pytest.approx((4096 * forward, 4096 * backward))


def test_elementwise_bytes_of_a_sharded_gpt_block_with_dropout() -> None:
    # GPT-22B (GeLU, learned positions, dropout), TP 8 with sequence parallelism: the norms
    # and residuals sharded (h / 8), dropout's mask written and read back.
    gpt = get_model("gpt-22b")
    setup = LayerSetup(tp=8, micro_batch_size=2, seq_len=2048, sequence_parallel=True,
                       dropout=True)
    h8, f8 = 6144 / 8, 24576 / 8
    forward = 2 * 4 * h8 + 2 * 7 * h8 + 4 * f8
    backward = 2 * 6 * h8 + 2 * 11 * h8 + 6 * f8
    assert elementwise_bytes(gpt, setup) == pytest.approx((4096 * forward, 4096 * backward))
    block = block_time(gpt, A100, setup)
    assert block.backward_elementwise == pytest.approx(
        elementwise_time(4096 * backward, 5, A100, C))


def test_the_tile_overhead_reproduces_cublas_rates_by_shape_on_h100() -> None:
    # OpenXLA's measured sm_90 BF16 table (benchmarks/data/gemm_shapes.json): with the shipped
    # per-tile overhead and the rate that makes 4096^3 exact, the shapes that fill a wave of
    # tiles are timed to a few per cent; a 128-K-element overhead (the former model) is not.
    import json
    import math
    import statistics
    from dataclasses import replace
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "gemm_shapes.json"
    table = next(t for t in json.loads(data.read_text())["tables"]
                 if t["id"] == "openxla-sm90-bf16")
    rows = [r for r in table["rows"] if math.ceil(r[0] / 128) * math.ceil(r[1] / 128) >= 132]
    assert len(rows) >= 25

    def median_error(overhead_s: float) -> float:
        c = replace(C, matmul_efficiency=1.0, tile_overhead_s=overhead_s)
        top = next(r for r in rows if r[:3] == [4096, 4096, 4096])
        # 4096^3: 32 x 32 tiles, 8 waves on 132 SMs; the rate that times it as measured
        tile_loop = (2 * 4096**3 / (top[3] * 1e12) - C.kernel_overhead_s) / 8 - overhead_s
        gpu = replace(H100, sustained_share=1.0, gemm_flops=132 * 2 * 128**2 * 4096 / tile_loop)
        assert 2 * 4096**3 / gemm_time(4096, 4096, 4096, gpu, c) / 1e12 == pytest.approx(top[3])
        return float(statistics.median(
            abs(2 * m * n * k / gemm_time(m, n, k, gpu, c) / 1e12 / rate - 1)
            for m, n, k, rate in rows))

    per_sm = 800e12 / 132
    assert median_error(C.tile_overhead_s) < 0.05
    assert median_error(2 * 128 * 128 * 128 / per_sm) > 1.5 * median_error(C.tile_overhead_s)


def test_flash_block_share_counts_each_query_blocks_overhead_and_the_causal_diagonal() -> None:
    from stagewise.plan.kernels import flash_block_share

    # 512 tokens: 4 query blocks of 128. Without a mask each visits 4 key blocks plus the
    # overhead; causal, block i visits i + 1 (10 in all) for 8 blocks' counted FLOPs, plus
    # 4 overheads: 8 / (10 + 4 x 0.7).
    assert flash_block_share(512, 0.7, 128, causal=False) == pytest.approx(4 / 4.7)
    assert flash_block_share(512, 0.7, 128) == pytest.approx(8 / (10 + 4 * 0.7))
    assert flash_block_share(100, 0.7, 128) == pytest.approx(1 / (2 + 1.4))  # one block
    assert flash_block_share(65536, 0.7, 128) > 0.99


def test_flash_attention_runs_slower_per_flop_at_short_sequences() -> None:
    from stagewise.plan.kernels import flash_block_share

    def per_flop(seq: int) -> tuple[float, float]:
        setup = LayerSetup(tp=1, micro_batch_size=16384 // seq, seq_len=seq)
        t = block_time(get_model("llama-2-7b"), H100, setup, C)
        flops = 4.0 * 16384 * seq * 4096 * 0.5  # causal half, 16k tokens either way
        return ((t.forward_attention - C.kernel_overhead_s) / flops,
                (t.backward_attention - 2 * C.kernel_overhead_s) / flops)

    short, long = per_flop(512), per_flop(8192)
    forward = flash_block_share(8192, C.flash_forward_block_overhead, 128) / flash_block_share(
        512, C.flash_forward_block_overhead, 128)
    backward = flash_block_share(8192, C.flash_backward_block_overhead, 128) / (
        flash_block_share(512, C.flash_backward_block_overhead, 128))
    assert short[0] / long[0] == pytest.approx(forward, rel=1e-6)
    assert short[1] / long[1] == pytest.approx(backward, rel=1e-6)
    assert forward > 1.3
    assert backward > 1.7


def test_the_block_overheads_reproduce_flash_attention_2s_h100_rates_by_length() -> None:
    # The non-causal FlashAttention-2 curves (benchmarks/data/attention_rates.json): with the
    # shipped overheads and each curve's own long-sequence rate (the geometric mean of rate /
    # share, the least-squares choice), every length within 3.5 %.
    import json
    import math
    from pathlib import Path

    from stagewise.plan.kernels import flash_block_share

    data = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "attention_rates.json"
    curves = [c for c in json.loads(data.read_text())["curves"] if c["rows"]]
    assert len(curves) >= 3
    for curve in curves:
        overhead = (C.flash_forward_block_overhead if curve["pass"] == "forward"
                    else C.flash_backward_block_overhead)
        logs = [math.log(r / flash_block_share(s, overhead, 128, causal=False))
                for s, r in curve["rows"]]
        top = math.exp(sum(logs) / len(logs))
        for s, r in curve["rows"]:
            model = top * flash_block_share(s, overhead, 128, causal=False)
            assert model == pytest.approx(r, rel=0.035), (curve["id"], s)
