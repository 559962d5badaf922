"""FLOP counts, kernel and block times, and step-time consistency."""

from __future__ import annotations

from dataclasses import replace

import pytest

from stagewise.errors import PlanError, StagewiseError
from stagewise.plan import (
    DEFAULT_CONSTANTS,
    Cluster,
    ParallelConfig,
    PipelineCache,
    TrainingSpec,
    evaluate,
    get_gpu,
    get_model,
    hardware_flops_per_token,
    layer_time,
    lower_bound_step_time,
    model_flops_per_token,
)
from stagewise.plan.comm import all_gather_time, all_reduce_time
from stagewise.plan.layer import LayerSetup, block_time, gemm_time
from stagewise.schedules import build
from stagewise.sim import Costs, simulate

H100 = get_gpu("h100")
A100 = get_gpu("a100-80gb")


def test_model_flops_reproduce_korthikanti_eq_7_and_the_published_mfu() -> None:
    gpt = get_model("gpt-22b")
    # The paper's symbols: L layers, V vocabulary size.
    s, b, L, h, V = 2048, 4, 48, 6144, 51200  # noqa: N806
    eq7 = 72 * b * L * s * h * h * (1 + s / (6 * h) + V / (12 * h * L))
    assert model_flops_per_token(gpt, s) * b * s == pytest.approx(eq7)
    # Table 5: 22B, 8 A100, 1.10 s per iteration -> MFU 41.5 %.
    assert eq7 / (1.10 * 8 * 312e12) == pytest.approx(0.415, abs=0.003)


def test_hardware_flops_of_full_recompute_match_eq_8() -> None:
    gpt = get_model("gpt-22b")
    s, L, h, V = 2048, 48, 6144, 51200  # noqa: N806 - L layers, V vocabulary (the paper's)
    eq8 = 96 * L * s * h * h * (1 + s / (6 * h) + V / (16 * h * L)) / s
    assert hardware_flops_per_token(gpt, s, "full") == pytest.approx(eq8)
    assert hardware_flops_per_token(gpt, s, "none") == pytest.approx(model_flops_per_token(gpt, s))


def test_lora_counts_two_forward_passes() -> None:
    llama = get_model("llama-2-7b")
    assert model_flops_per_token(llama, 4096, "lora") == pytest.approx(
        model_flops_per_token(llama, 4096) * 2 / 3
    )


def test_gemm_time_is_waves_of_tiles_at_the_sustained_rate() -> None:
    c = DEFAULT_CONSTANTS
    # 8192^3 on H100: 64 x 64 = 4096 tiles of 128 x 128 on 132 SMs: 31.03 -> 32 waves, each
    # tile 2 x 128 x 128 x 8192 FLOPs at matmul_efficiency of the measured 794.5 TFLOP/s
    # burst rate (not the 989.4 peak) x 0.905 sustained at 700 W / 132 SMs, plus the tile's
    # fixed prologue and epilogue.
    assert H100.sustained_share == 0.905
    per_sm = 794.5e12 * 0.905 * c.matmul_efficiency / 132
    expected = 32 * (2 * 128 * 128 * 8192 / per_sm + c.tile_overhead_s)
    assert c.gemm_tile == 128
    assert gemm_time(8192, 8192, 8192, H100, c) == pytest.approx(expected + c.kernel_overhead_s)


def test_gemm_efficiency_falls_for_thin_slices_and_few_tokens() -> None:
    c = DEFAULT_CONSTANTS

    def efficiency(m: int, n: int, k: int) -> float:
        return 2 * m * n * k / gemm_time(m, n, k, H100, c) / H100.peak_flops

    assert efficiency(8192, 8192, 8192) > efficiency(8192, 1024, 8192) > efficiency(8192, 128, 8192)
    assert efficiency(8192, 8192, 8192) > efficiency(512, 8192, 8192) > efficiency(16, 8192, 8192)
    assert efficiency(8192, 8192, 8192) < c.matmul_efficiency


def test_layer_time_of_a_tp_slice() -> None:
    times = {t: layer_time("llama-2-70b", "h100", t, 1, 4096) for t in (1, 2, 4, 8)}
    alone = {t: layer_time("llama-2-70b", "h100", t, 1, 4096, include_comm=False)
             for t in (1, 2, 4, 8)}
    assert times[1] == alone[1]  # no collectives without TP
    for t in (2, 4, 8):
        assert times[t][0] > alone[t][0]
        assert times[t][1] >= alone[t][1]  # the backward's may hide behind its GEMMs
        # A thinner slice is faster but less than t times faster.
        assert alone[t][0] < alone[1][0]
        assert alone[t][0] * t > alone[1][0]
    for fwd, bwd in alone.values():
        # two GEMMs per forward GEMM, flash backward 2.5x; element-wise backward lighter
        assert 1.8 < bwd / fwd < 2.6
    # 2 x 0.87e9 weights x 4096 tokens of GEMMs and 2 x 4096^2 x 8192 of causal attention,
    # at the sustained share of H100's measured 794.5 TFLOP/s (x 0.905 at the power limit),
    # plus a little element-wise work and tile/wave rounding: at most 15 % above the pure
    # FLOP time.
    flops = 2 * 0.87e9 * 4096 + 2 * 4096**2 * 8192
    ideal = flops / (DEFAULT_CONSTANTS.matmul_efficiency * 794.5e12 * 0.905)
    assert ideal < alone[1][0] < 1.15 * ideal


def test_backward_tp_collectives_hide_behind_the_column_parallel_gemms() -> None:
    # Megatron's column-parallel linears (QKV, MLP up) run the input gradient's all-reduce
    # during their weight-gradient GEMM; only what outlasts that GEMM is exposed.
    model, t, tokens = get_model("llama-2-70b"), 8, 4096
    h, kv, f = model.hidden, model.kv_dim, model.ffn
    wgrad_qkv = gemm_time(h, (h + 2 * kv) / t, tokens, H100, DEFAULT_CONSTANTS)
    wgrad_up = gemm_time(h, 2 * f / t, tokens, H100, DEFAULT_CONSTANTS)
    hidden = []
    for bandwidth in (450e9, 10e9, 1e9):  # the slower the link, the less is hidden
        setup = LayerSetup(tp=t, micro_batch_size=1, seq_len=tokens, tp_bandwidth=bandwidth)
        reduce = all_reduce_time(2 * tokens * h, t, bandwidth, DEFAULT_CONSTANTS)
        block = block_time(model, H100, setup)
        exposed = max(0.0, reduce - wgrad_qkv) + max(0.0, reduce - wgrad_up)
        assert block.backward_tp_comm == pytest.approx(exposed)
        assert block.forward_tp_comm == pytest.approx(2 * reduce)
        synchronous = replace(DEFAULT_CONSTANTS, tp_overlap="none")
        assert block_time(model, H100, setup, synchronous).backward_tp_comm == pytest.approx(
            2 * reduce)
        hidden.append(1 - block.backward_tp_comm / (2 * reduce))
    assert 0.5 < hidden[0] < 1  # on NVLink the MLP's all-reduce hides whole, QKV's in part
    assert hidden[0] > hidden[1] > hidden[2] > 0


def test_sequence_parallel_backward_hides_the_regathers_and_reduce_scatters() -> None:
    # With sequence parallelism the column-parallel linears re-gather their input during
    # the input-gradient GEMM and reduce-scatter the input gradient during the weight-gradient
    # GEMM; the row-parallel linears' output-gradient gathers (2) come first: exposed.
    model, t, tokens = get_model("gpt-3-175b"), 8, 2048
    h, f = model.hidden, model.ffn
    c = DEFAULT_CONSTANTS
    qkv, up = (h + 2 * model.kv_dim) / t, f / t  # GeLU MLP: one up projection
    dgrad = {"qkv": gemm_time(tokens, h, qkv, A100, c), "up": gemm_time(tokens, h, up, A100, c)}
    wgrad = {"qkv": gemm_time(h, qkv, tokens, A100, c), "up": gemm_time(h, up, tokens, A100, c)}
    for bandwidth in (300e9, 5e9):
        setup = LayerSetup(tp=t, micro_batch_size=1, seq_len=tokens, sequence_parallel=True,
                           tp_bandwidth=bandwidth)
        gather = all_gather_time(2 * tokens * h, t, bandwidth, c)
        exposed = 2 * gather + sum(max(0.0, gather - dgrad[k]) + max(0.0, gather - wgrad[k])
                                   for k in ("qkv", "up"))
        block = block_time(model, A100, setup)
        assert block.backward_tp_comm == pytest.approx(exposed)
        assert block.forward_tp_comm == pytest.approx(4 * gather)
        synchronous = replace(c, tp_overlap="none")
        assert block_time(model, A100, setup, synchronous).backward_tp_comm == pytest.approx(
            6 * gather)


def test_userbuffers_overlap_hides_every_collective_behind_its_gemm() -> None:
    # tp_overlap="all" (Transformer Engine userbuffers, sequence parallel): each linear's
    # forward gather / reduce-scatter runs with its forward GEMM, the row-parallel linears'
    # output-gradient gathers with their input-gradient GEMMs.
    model, t, tokens = get_model("gpt-3-175b"), 4, 2048
    h, f = model.hidden, model.ffn
    c = replace(DEFAULT_CONSTANTS, tp_overlap="all")
    shapes = [(tokens, 3 * h / t, h), (tokens, h, h / t), (tokens, f / t, h), (tokens, h, f / t)]
    forward = [gemm_time(m, n, k, H100, c) for m, n, k in shapes]
    dgrad = [gemm_time(m, k, n, H100, c) for m, n, k in shapes]
    wgrad = [gemm_time(k, n, m, H100, c) for m, n, k in shapes]
    for bandwidth in (450e9, 5e9):
        setup = LayerSetup(tp=t, micro_batch_size=1, seq_len=tokens, sequence_parallel=True,
                           tp_bandwidth=bandwidth)
        gather = all_gather_time(2 * tokens * h, t, bandwidth, c)
        exposed_forward = sum(max(0.0, gather - g) for g in forward)
        exposed_backward = sum(max(0.0, gather - dgrad[i]) + max(0.0, gather - wgrad[i])
                               for i in (0, 2)) + sum(max(0.0, gather - dgrad[i]) for i in (1, 3))
        block = block_time(model, H100, setup, c)
        assert block.forward_tp_comm == pytest.approx(exposed_forward)
        assert block.backward_tp_comm == pytest.approx(exposed_backward)
        megatron = block_time(model, H100, setup)  # "backward": the forward's all exposed
        assert megatron.forward_tp_comm == pytest.approx(4 * gather)
        assert block.tp_comm <= megatron.tp_comm
    with pytest.raises(PlanError, match="tp_overlap must be one of none, backward, all"):
        replace(DEFAULT_CONSTANTS, tp_overlap="some")


def test_layer_time_rejects_a_tp_that_does_not_divide_the_heads() -> None:
    with pytest.raises(PlanError, match="does not divide"):
        layer_time("llama-2-70b", "h100", 3, 1, 4096)
    with pytest.raises(PlanError, match="unknown GPU"):
        layer_time("llama-2-70b", "h1000", 8, 1, 4096)


def test_full_recompute_adds_one_forward_to_the_backward() -> None:
    fwd, bwd = layer_time("llama-2-7b", "a100", 2, 1, 2048)
    fwd_r, bwd_r = layer_time("llama-2-7b", "a100", 2, 1, 2048, recompute="full")
    assert fwd_r == pytest.approx(fwd)
    assert bwd_r == pytest.approx(bwd + fwd)


def test_lower_bound_of_the_lesson_run() -> None:
    llama = get_model("llama-2-70b")
    cluster = Cluster(H100, 1, 8)
    run = TrainingSpec(seq_len=4096, global_batch=64)
    h, s = 8192, 4096
    forward = 80 * (2 * llama.layer_matmul_params + 2 * s * h) + 2 * h * 32000  # causal
    expected = 3 * forward * 64 * s / (8 * 989.4e12)
    assert lower_bound_step_time(llama, cluster, run) == pytest.approx(expected)
    assert expected > 13.0  # the lesson's 1.85 steps/s (0.54 s) is impossible


def test_step_time_parts_add_up_and_bubble_is_near_closed_form() -> None:
    model = get_model("llama-2-7b")
    cluster = Cluster(H100, 1, 8)
    run = TrainingSpec(seq_len=4096, global_batch=32)
    plan = evaluate(model, cluster, run, ParallelConfig.of(tp=2, pp=4, dp=1, micro_batch_size=2))
    t = plan.time
    parts = t.compute_s + t.tp_comm_s + t.bubble_s + t.dp_exposed_s + t.optimizer_s
    assert parts + t.embedding_sync_s == pytest.approx(t.step_s)
    # 1F1B, p = 4, m = 16: (p-1)/m = 0.1875 relative to ideal compute, a little more with the
    # heavier last stage (the head) and the transfers.
    assert 0.1875 <= t.bubble.vs_ideal < 0.3
    assert plan.tokens_per_s == pytest.approx(32 * 4096 / t.step_s)
    assert plan.mfu == pytest.approx(plan.tflops_per_gpu * 1e12 / H100.peak_flops)


def test_exposed_dp_reduction_is_all_of_it_without_overlap() -> None:
    model = get_model("llama-2-7b")
    cluster = Cluster(H100, 2, 8)
    cfg = ParallelConfig.of(tp=2, pp=2, dp=4, micro_batch_size=1)
    overlap = evaluate(model, cluster, TrainingSpec(seq_len=4096, global_batch=32), cfg).time
    exposed = evaluate(
        model, cluster, TrainingSpec(seq_len=4096, global_batch=32, dp_overlap=False), cfg
    ).time
    assert exposed.dp_exposed_s == pytest.approx(exposed.dp_total_s)
    assert overlap.dp_exposed_s < exposed.dp_exposed_s
    assert overlap.step_s < exposed.step_s


def test_single_replica_has_no_dp_reduction_and_lora_no_optimizer_to_speak_of() -> None:
    model = get_model("llama-2-7b")
    cluster = Cluster(H100, 1, 8)
    run = TrainingSpec(seq_len=4096, global_batch=32, mode="lora")
    t = evaluate(model, cluster, run, ParallelConfig.of(tp=2, pp=4, dp=1, num_chunks=2,
                                                     schedule="interleaved-1f1b")).time
    assert t.dp_exposed_s == 0.0
    assert t.dp_total_s == 0.0
    assert t.optimizer_s < 1e-3  # only the adapters are updated


def test_cached_pipeline_run_matches_a_direct_simulation() -> None:
    cache = PipelineCache()
    schedule = build("interleaved-1f1b", num_ranks=4, num_microbatches=8, num_chunks=2)
    forward = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.3]
    backward = [2.1 * f for f in forward]
    direct = simulate(schedule, Costs.per_stage(forward, backward))
    run = cache.run("interleaved-1f1b", 4, 8, 2, forward, backward,
                    [b / 2 for b in backward], [0.0] * 8)
    assert run.makespan == pytest.approx(direct.makespan, rel=0.02)
    assert run.busy == pytest.approx([direct.busy(r) for r in range(4)])
    again = cache.run("interleaved-1f1b", 4, 8, 2, [2 * f for f in forward],
                      [2 * b for b in backward], [b for b in backward], [0.0] * 8)
    assert cache.simulations == 1  # same ratios: served from the cache, scaled
    assert again.makespan == pytest.approx(2 * run.makespan)


def test_dp_reduction_starts_with_the_last_backward() -> None:
    # One stage per rank (PP=1), DP=8 over the network (one GPU per node): the gradients'
    # all-reduce starts when the last micro-batch's backward starts (chunked by layer), so
    # only what outlasts that backward is exposed, and at least the last layer's chunk.
    model = get_model("llama-2-7b")
    cluster = Cluster(H100, 8, 1)
    training = TrainingSpec(seq_len=4096, global_batch=16)
    config = ParallelConfig.of(tp=1, pp=1, dp=8, micro_batch_size=1, dp_sharding="none")
    plan = evaluate(model, cluster, training, config)
    reduce = all_reduce_time(4.0 * model.num_params, 8, H100.network_bandwidth,
                             DEFAULT_CONSTANTS)
    assert plan.time.dp_total_s == pytest.approx(reduce)
    block, layers = plan.time.block, model.layers
    last_backward = layers * block.backward  # plus the embedding's and the head's
    assert reduce > last_backward  # over one 50 GB/s NIC it outlasts one backward
    assert plan.time.dp_exposed_s < reduce - last_backward
    assert plan.time.dp_exposed_s > 0.9 * (reduce - last_backward)
    # over NVLink the reduction hides behind the last backward but its last layer's chunk
    in_node = evaluate(model, Cluster(H100, 1, 8), training, config)
    nvlink = all_reduce_time(4.0 * model.num_params, 8, H100.nvlink_bandwidth,
                             DEFAULT_CONSTANTS)
    assert nvlink < last_backward
    assert in_node.time.dp_exposed_s == pytest.approx(nvlink / layers, rel=0.02)
    overlapless = evaluate(model, cluster, replace(training, dp_overlap=False), config)
    assert overlapless.time.dp_exposed_s == pytest.approx(reduce)


def test_an_overlapped_parameter_gather_hides_behind_the_first_forward() -> None:
    # The distributed optimizer (ZeRO-1) gathers the updated bf16 weights after every step.
    # Exposed whole by default; with param_gather_overlap (Megatron's --overlap-param-gather,
    # NeMo's overlap_param_sync) the gather runs bucket by bucket during the next step's first
    # forward: only what outlasts one micro-batch's forward through the rank's layers is
    # exposed, and at least one layer's bucket.
    model = get_model("llama-2-7b")
    training = TrainingSpec(seq_len=4096, global_batch=16)
    config = ParallelConfig.of(tp=1, pp=1, dp=8, micro_batch_size=1, dp_sharding="optimizer")
    on = replace(DEFAULT_CONSTANTS, param_gather_overlap=True)
    for cluster, bandwidth in ((Cluster(H100, 8, 1), H100.network_bandwidth),
                               (Cluster(H100, 1, 8), H100.nvlink_bandwidth)):
        exposed = evaluate(model, cluster, training, config).time
        hidden = evaluate(model, cluster, training, config, on).time
        gather = all_gather_time(2.0 * model.num_params, 8, bandwidth, DEFAULT_CONSTANTS)
        blocks = model.layers * exposed.block.forward  # the forward without embedding and head
        saved = exposed.step_s - hidden.step_s
        assert saved == pytest.approx(exposed.dp_exposed_s - hidden.dp_exposed_s)
        assert hidden.dp_total_s == exposed.dp_total_s  # the same gather, only hidden
        if gather > 1.2 * blocks:  # one NIC: the blocks' forward hides, plus a little (edges)
            assert blocks <= saved < 1.1 * blocks
        else:  # NVLink: all but the first layer's bucket hides
            assert saved == pytest.approx(gather * (1 - 1 / model.layers))
    replicated = replace(config, dp_sharding="none")
    assert (evaluate(model, Cluster(H100, 8, 1), training, replicated, on).time.step_s
            == evaluate(model, Cluster(H100, 8, 1), training, replicated).time.step_s)


def test_the_fast_search_stays_exact_with_an_overlapped_parameter_gather() -> None:
    # The search prunes with tail_floor, which must stay a lower bound of what a step adds
    # after its pipeline when the gather is overlapped (it then counts none of it): the
    # fastest plans and their times are those of evaluating every candidate on its own.
    from stagewise.plan.search import candidates, search

    on = replace(DEFAULT_CONSTANTS, param_gather_overlap=True)
    model, cluster = get_model("llama-2-13b"), Cluster(H100, 2, 8)
    training = TrainingSpec(seq_len=2048, global_batch=32)
    k = 10
    fast = search(model, cluster, training, constants=on, exact_top=k).fitting
    exact = []
    for config in candidates(model, cluster, training):
        try:
            plan = evaluate(model, cluster, training, config, on)
        except StagewiseError:  # a schedule the micro-batches cannot run, as the search skips
            continue
        if plan.fits:
            exact.append(plan.time.step_s)
    assert [p.time.step_s for p in fast[:k]] == sorted(exact)[:k]


def test_fsdp_gathers_and_reduce_scatters_in_every_micro_batch() -> None:
    """FULL_SHARD over a slow network: each micro-batch gathers every block's weights before
    its forward and its backward and reduce-scatters its gradients; the step is bound by
    those collectives (computed here from the ring formula by hand), not by one reduction
    at the end of the step, and grows with the number of micro-batches."""
    model = get_model("llama-2-7b")
    slow = replace(H100, network_bandwidth=1e9)  # 1 GB/s between nodes: comm-bound
    cluster = Cluster(slow, 2, 8)
    c = DEFAULT_CONSTANTS

    def plan(global_batch: int):  # type: ignore[no-untyped-def]
        cfg = ParallelConfig.of(tp=8, pp=1, dp=2, micro_batch_size=1, dp_sharding="weights")
        return evaluate(model, cluster, TrainingSpec(seq_len=2048, global_batch=global_batch),
                        cfg, c)

    one, four = plan(2), plan(8)
    assert (one.num_microbatches, four.num_microbatches) == (1, 4)
    rate = 1e9 * c.link_efficiency  # 8 GPUs per node over TP 8: one NIC per DP ring member
    block = model.layer_params / 8  # the TP slice's parameters
    gather = 0.5 * block * 2 / rate + c.collective_latency_s  # ring of 2: (d - 1) / d
    scatter = 0.5 * block * 4 / rate + c.collective_latency_s  # fp32 gradients
    per_microbatch = (model.layers + 1) * gather + model.layers * (gather + scatter) + gather
    for p in (one, four):
        assert p.time.dp_exposed_s == 0.0  # nothing left for the end of the step
        assert p.time.step_s == pytest.approx(
            p.num_microbatches * per_microbatch + p.time.optimizer_s, rel=0.01)
        assert p.time.dp_total_s == pytest.approx(
            p.num_microbatches * model.layers * (2 * gather + scatter))


def test_sustained_share_scales_the_gemm_rate_and_is_checked() -> None:
    """The power-limited share multiplies both data types' measured rates; A100 keeps its
    burst rate (its peak is defined at its top clock); a share outside (0, 1] is refused."""
    assert H100.achievable_gemm_flops() == pytest.approx(794.5e12 * 0.905)
    assert H100.achievable_gemm_flops(fp8=True) == pytest.approx(1402.6e12 * 0.905)
    assert A100.achievable_gemm_flops() == pytest.approx(271.2e12)
    with pytest.raises(PlanError, match="sustained_share must be in"):
        replace(H100, sustained_share=1.2)
