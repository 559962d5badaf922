"""Step time: the simulated pipeline, then the data-parallel reduction and the optimizer step.

step = pipeline makespan (stagewise simulator: compute, TP collectives inside each stage's
cost, point-to-point transfers between stages, the bubble) + the exposed part of the DP
gradient reduction + the optimizer step (+ the tied-embedding gradient sync across the first
and last stage). With ``dp_overlap`` (Megatron-LM's ``overlap_grad_reduce``) the reduction is
chunked by the layers of a stage and overlaps compute, one stream per rank, stages in the order
they finish; only what runs past the end of the pipeline is exposed, without it the whole
reduction is. With pipeline parallelism a stage's chunk starts when its last backward ends;
without it (one stage per rank) each layer's chunk starts as the last backward reaches it, so
the reduction starts with the last backward and at least the last layer's chunk is exposed
(NeMo's "Communication Overlap" guide: DP communication chunked by a transformer layer, by the
layers of a virtual pipeline stage with pipeline parallelism, one chunk exposed). The
distributed optimizer's parameter all-gather is exposed whole, or with
``Constants.param_gather_overlap`` only what outlasts one micro-batch's forward through the
rank's layers, and at least one layer's bucket (the first layer waits for its own).

On DeepSpeed's pipeline engine (``TrainingSpec.engine == "deepspeed"``, Megatron-DeepSpeed)
the reduction runs after the last backward whatever ``dp_overlap`` says (the engine turns
ZeRO's ``overlap_comm`` off: "Pipeline parallelism does not support overlapped
communication"), its bf16 optimizer all-reduces its whole fp32 gradient buffer even with the
optimizer state sharded, and each stage's costs carry what the engine adds per micro-batch
(:func:`_deepspeed_costs`: blocking sends, the own-output gather, the fp32 gradient copy;
deepspeed/runtime/pipe/engine.py, p2p.py and bf16_optimizer.py).

With the weights sharded too (``dp_sharding="weights"``: FSDP FULL_SHARD, ZeRO-3) nothing of
this runs at the end of the step: every micro-batch gathers each block's parameters before
its forward and again before its backward, and reduce-scatters its gradients after the
backward (PyTorch FSDP and FSDP2, DeepSpeed ZeRO-3 with gradient accumulation), each layer's
collectives prefetched behind the previous layer's compute (:func:`fsdp_layer_comm`). A
stage's forward then takes max(compute, its layers' gathers) plus the first layer's gather,
which nothing hides; its backward max(compute, gathers + reduce-scatters) plus one gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from stagewise.plan.comm import all_gather_time, all_reduce_time, group_bandwidth
from stagewise.plan.constants import Constants
from stagewise.plan.hardware import Cluster
from stagewise.plan.kernels import elementwise_time
from stagewise.plan.layer import BYTES, LayerSetup, LayerTime, block_time
from stagewise.plan.memory import lora_params_per_block
from stagewise.plan.models import ModelSpec
from stagewise.plan.pipeline_cache import PipelineCache
from stagewise.plan.rank import RankSizes
from stagewise.plan.spec import ParallelConfig, TrainingSpec
from stagewise.plan.stages import edge_times, hop_parts, node_of_rank, stage_costs
from stagewise.sim import Bubble

__all__ = [
    "StageProfile", "StepTime", "embedding_sync_time", "fsdp_layer_comm", "stage_profile",
    "step_time", "tail_floor",
]

ADAM_BYTES_PER_PARAM = 34.0  # fp32 grad, master, m, v read; master, m, v, bf16 weight written; norm
# DeepSpeed BF16_Optimizer.update_hp_grads, after every micro-batch's backward, per trainable
# parameter: ``hp_grad.add_(lp.grad.to(torch.float32))``, a cast (read 2 bytes, write 4) and an
# add (read 4 + 4, write 4).
BF16_GRAD_COPY_BYTES = 18.0
# Transformer Engine casts a linear's bf16 weight to FP8 and its transpose (read 2 bytes, write
# 1 + 1) in the forward. Megatron-LM and NeMo pass ``is_first_microbatch`` so the cast runs once
# per step (negligible beside the optimizer's 34 bytes); TE modules called without it, as a
# PyTorch stack does (LLM Foundry's ``te.Linear`` under FSDP, which also re-gathers the bf16
# weights every micro-batch), cast every micro-batch (the pytorch engine).
FP8_WEIGHT_CAST_BYTES = 4.0


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step, by part (they add up to ``step_s``).

    Attributes:
        step_s: the whole step.
        compute_s: compute of the busiest pipeline rank (GEMMs, attention, element-wise,
            recomputation).
        tp_comm_s: TP collectives on that rank.
        bubble_s: that rank's idle time inside the pipeline (fill, drain, waiting for
            transfers and for slower stages).
        dp_exposed_s: DP gradient reduction (and parameter gather) not hidden by compute.
        optimizer_s: the optimizer step.
        embedding_sync_s: all-reduce of the tied embedding's gradient between first and last
            stage.
        dp_total_s: the whole DP reduction, hidden or not.
        pp_p2p_s: one micro-batch's transfers over every stage boundary, forward and
            backward (inside ``bubble_s`` where they delay work).
        bubble: the simulated bubble fraction, both ways.
        block: one block's forward/backward breakdown.
    """

    step_s: float
    compute_s: float
    tp_comm_s: float
    bubble_s: float
    dp_exposed_s: float
    optimizer_s: float
    embedding_sync_s: float
    dp_total_s: float
    pp_p2p_s: float
    bubble: Bubble
    block: LayerTime


def fsdp_layer_comm(
    model: ModelSpec, cluster: Cluster, training: TrainingSpec, config: ParallelConfig,
    c: Constants,
) -> tuple[float, float]:
    """(parameter all-gather, gradient reduce-scatter) seconds of one block's FSDP collectives
    over the DP group, once per micro-batch each way (0, 0 unless the weights are sharded).

    The gather moves the block's bf16 parameters (its TP slice); the reduce-scatter its
    trainable ones (LoRA: the adapters) in ``grad_bytes``.
    """
    if not (config.shards("weights") and config.dp > 1):
        return 0.0, 0.0
    bandwidth = group_bandwidth(cluster, config.dp, config.tp)
    params = model.layer_params / config.tp
    trainable = params
    if training.mode == "lora" and training.lora_rank is not None:
        trainable = lora_params_per_block(model, training.lora_rank) / config.tp
    gather = all_gather_time(params * BYTES, config.dp, bandwidth, c)
    scatter = all_gather_time(trainable * training.grad_bytes, config.dp, bandwidth, c)
    return gather, scatter


def _with_fsdp(
    layers: tuple[int, ...], forward: list[float], backward: list[float], gather: float,
    scatter: float,
) -> tuple[list[float], list[float]]:
    """Stage costs with each micro-batch's FSDP collectives overlapped layer by layer."""
    if gather == 0.0 and scatter == 0.0:
        return forward, backward
    f = [max(cost, n * gather) + (gather if n else 0.0)
         for n, cost in zip(layers, forward, strict=True)]
    b = [max(cost, n * (gather + scatter)) + (gather if n else 0.0)
         for n, cost in zip(layers, backward, strict=True)]
    return f, b


def _dp_reduce(
    cluster: Cluster, config: ParallelConfig, training: TrainingSpec, trainable: float,
    c: Constants,
) -> tuple[float, float]:
    """(gradient reduction, parameter gather) seconds over the DP group of one GPU."""
    if config.dp == 1 or config.shards("weights"):  # FSDP: inside every micro-batch
        return 0.0, 0.0
    bandwidth = group_bandwidth(cluster, config.dp, config.tp)
    grads = trainable * training.grad_bytes
    if config.shards("optimizer"):
        gather = all_gather_time(trainable * BYTES, config.dp, bandwidth, c)
        if training.bf16_grad_copy:  # BF16_Optimizer all-reduces its whole fp32 buffer
            return all_reduce_time(grads, config.dp, bandwidth, c), gather
        return all_gather_time(grads, config.dp, bandwidth, c), gather
    return all_reduce_time(grads, config.dp, bandwidth, c), 0.0


@dataclass(frozen=True)
class StageProfile:
    """One micro-batch's costs per stage and transfer times per boundary, in seconds;
    ``fsdp``: one block's FSDP (gather, reduce-scatter), already inside forward and backward."""

    block: LayerTime
    forward: list[float]
    backward: list[float]
    weight: list[float]
    hops: list[float]
    fsdp: tuple[float, float] = (0.0, 0.0)

    def busiest(
        self, rank_stages: Sequence[tuple[int, ...]], num_microbatches: int, splits: bool
    ) -> float:
        """A step cannot be shorter: max over ranks of fill + compute + drain.

        ``rank_stages`` gives each rank's stages, ``splits`` whether the schedule splits
        the backward. Rank r computes m x (its stages' forward + backward) in all. Its first
        action is a forward of one of its stages s, which waits for the forwards (and transfers) of
        every stage before s; its last action, a backward of one of its stages, is followed
        by the backwards of the stages before it (not when the backward is split: a W can
        come last). Exact for 1F1B and interleaved 1F1B with even stages and no transfers.
        """
        m = num_microbatches
        head, tail = [0.0], [0.0]
        for f, b, hop in zip(self.forward, self.backward, self.hops, strict=True):
            head.append(head[-1] + f + hop)
            tail.append(tail[-1] + b + hop)
        return max(
            min(head[s] for s in stages) + (0.0 if splits else min(tail[s] for s in stages))
            + m * sum(self.forward[s] + self.backward[s] for s in stages)
            for stages in rank_stages
        )


def _overlaps_dp(training: TrainingSpec) -> bool:
    """Whether the DP reduction overlaps the backward: asked for, and not on DeepSpeed's
    pipeline engine (it reduces after the last backward, and turns ZeRO's ``overlap_comm``
    off: "Pipeline parallelism does not support overlapped communication")."""
    return training.dp_overlap and training.engine != "deepspeed"


def _rank_tail(
    cluster: Cluster, config: ParallelConfig, training: TrainingSpec, trainable: float,
    c: Constants,
) -> tuple[float, float, float]:
    """(DP gradient reduction, parameter gather, optimizer step) seconds of one rank."""
    reduce_s, gather_s = _dp_reduce(cluster, config, training, trainable, c)
    state = trainable / (config.dp if config.shards("optimizer") else 1)
    hbm = cluster.gpu.hbm_bandwidth * c.hbm_efficiency
    optimizer = ADAM_BYTES_PER_PARAM * state / hbm + 10 * c.kernel_overhead_s
    return reduce_s, gather_s, optimizer


def _exposed_gather(
    gather_s: float, size: RankSizes, layers: tuple[int, ...], profile: StageProfile
) -> float:
    """The overlapped parameter gather's exposed seconds on one rank: what outlasts one
    micro-batch's forward through its stages, and at least one layer's bucket."""
    forward = sum(profile.forward[s] for s in size.stages)
    rank_layers = max(1, sum(layers[s] for s in size.stages))
    return max(gather_s / rank_layers, gather_s - forward)


def embedding_sync_time(
    model: ModelSpec, cluster: Cluster, training: TrainingSpec, config: ParallelConfig,
    c: Constants,
) -> float:
    """The tied embedding's gradient all-reduce between the first and the last stage."""
    if not (model.tied_embeddings and config.pp > 1 and training.mode == "full"):
        return 0.0
    crosses = node_of_rank(cluster, config, 0) != node_of_rank(cluster, config, config.pp - 1)
    gpu = cluster.gpu
    bandwidth = gpu.network_bandwidth if crosses else gpu.nvlink_bandwidth
    grads = model.padded_vocab(config.tp) * model.hidden / config.tp * training.grad_bytes
    return all_reduce_time(grads, 2, bandwidth, c)


def tail_floor(
    model: ModelSpec,
    cluster: Cluster,
    training: TrainingSpec,
    config: ParallelConfig,
    sizes: list[RankSizes],
    c: Constants,
) -> float:
    """What a step adds after its pipeline at least: every rank's parameter gather and
    optimizer step (and its whole reduction without overlap), and the embedding sync.

    :func:`step_time` adds the largest of (exposed reduction + gather + optimizer) over
    ranks, and the exposed reduction is >= 0 (= the whole one without ``dp_overlap``).
    """
    floor = 0.0
    for size in sizes:
        reduce_s, gather_s, optimizer = _rank_tail(cluster, config, training, size.trainable, c)
        exposed = 0.0 if _overlaps_dp(training) else reduce_s
        gather = 0.0 if c.param_gather_overlap else gather_s  # overlapped: >= 0 exposed
        floor = max(floor, exposed + gather + optimizer)
    return floor + embedding_sync_time(model, cluster, training, config, c)


def stage_profile(
    model: ModelSpec,
    cluster: Cluster,
    training: TrainingSpec,
    config: ParallelConfig,
    layers: tuple[int, ...],
    placement: tuple[int, ...],
    c: Constants,
) -> StageProfile:
    """The per-stage costs the simulator is given for ``config``."""
    setup = LayerSetup(
        tp=config.tp,
        micro_batch_size=config.micro_batch_size,
        seq_len=training.seq_len,
        recompute=config.recompute,
        sequence_parallel=config.sequence_parallel,
        attention=training.attention,
        dropout=training.uses_dropout(model),
        lora_rank=training.lora_rank if training.mode == "lora" else None,
        tp_bandwidth=group_bandwidth(cluster, config.tp, 1),
        fp8=training.precision == "fp8",
    )
    block = block_time(model, cluster.gpu, setup, c)
    embed, head = edge_times(model, cluster, training, config, setup, c)
    forward, backward, weight = stage_costs(layers, block, embed, head)
    if setup.fp8 and training.engine == "pytorch":
        cast = elementwise_time(FP8_WEIGHT_CAST_BYTES * model.layer_matmul_params / config.tp,
                                4, cluster.gpu, c)
        forward = [cost + n * cast for n, cost in zip(layers, forward, strict=True)]
    fsdp = fsdp_layer_comm(model, cluster, training, config, c)
    forward, backward = _with_fsdp(layers, forward, backward, *fsdp)
    sends, regather = hop_parts(model, cluster, training, config, placement, c)
    hops = [send + regather if send else 0.0 for send in sends]
    if training.engine == "deepspeed":
        forward, backward = _deepspeed_costs(model, cluster, training, config, layers,
                                             forward, backward, sends, regather, c)
        # a blocking send returns when its data has arrived: the receiver waits only for
        # its TP all-gather of the shares
        hops = [regather if send else 0.0 for send in sends]
    return StageProfile(block, forward, backward, weight, hops, fsdp)


def _stage_trainable(
    model: ModelSpec, training: TrainingSpec, config: ParallelConfig, layers: tuple[int, ...]
) -> list[float]:
    """Trainable parameters of each stage on one GPU of its TP group: its blocks (LoRA: their
    adapters), the embedding on the first, the head (with tied embeddings, its own copy of the
    embedding matrix) on the last; the count :func:`rank.rank_sizes` makes per rank when each
    rank holds one stage."""
    t = config.tp
    if training.mode == "lora":
        return [n * lora_params_per_block(model, training.lora_rank) / t for n in layers]
    counts = [n * model.layer_params / t for n in layers]
    counts[0] += model.embedding_params(t) / t
    counts[-1] += model.head_params(t) / t
    if model.tied_embeddings and len(layers) > 1:
        counts[-1] += model.padded_vocab(t) * model.hidden / t
    return counts


def _deepspeed_costs(
    model: ModelSpec, cluster: Cluster, training: TrainingSpec, config: ParallelConfig,
    layers: tuple[int, ...], forward: list[float], backward: list[float], sends: list[float],
    regather: float, c: Constants,
) -> tuple[list[float], list[float]]:
    """Stage costs on DeepSpeed's pipeline engine (``TrainingSpec.engine``): every send blocks
    the stage that sends (``p2p.send`` asserts ``async_op == False``), so a stage's forward
    also sends its activation and its backward its input gradient, each after the other; before
    its backward a stage all-gathers its own partitioned output over TP (``PartitionedTensor
    .full()``); with the bf16 optimizer each backward ends copying the stage's weight gradients
    into fp32 (:data:`BF16_GRAD_COPY_BYTES` per trainable parameter over HBM)."""
    last = len(layers) - 1
    hbm = cluster.gpu.hbm_bandwidth * c.hbm_efficiency
    trainable = _stage_trainable(model, training, config, layers)
    forward = [f + sends[s] for s, f in enumerate(forward)]
    out = []
    for s, b in enumerate(backward):
        b += sends[s - 1] if s > 0 else 0.0
        if s < last and config.tp > 1 and not config.sequence_parallel:
            b += regather
        if training.bf16_grad_copy:
            b += BF16_GRAD_COPY_BYTES * trainable[s] / hbm + c.kernel_overhead_s
        out.append(b)
    return forward, out


def step_time(
    model: ModelSpec,
    cluster: Cluster,
    training: TrainingSpec,
    config: ParallelConfig,
    layers: tuple[int, ...],
    sizes: list[RankSizes],
    cache: PipelineCache,
    c: Constants,
    profile: StageProfile | None = None,
) -> StepTime:
    """Predict one step of ``config`` (see the module docstring)."""
    m = config.num_microbatches(training)
    if profile is None:
        placement = cache.placement(config.schedule, config.pp, m, config.num_chunks)
        profile = stage_profile(model, cluster, training, config, layers, placement, c)
    block, hops = profile.block, profile.hops
    shape = (config.schedule, config.pp, m, config.num_chunks)
    run = cache.run(*shape, profile.forward, profile.backward, profile.weight, hops)
    # The cached run snaps costs to a grid (its idle time is within a few tenths of a percent);
    # the fill + compute + drain floor is exact, so the makespan never goes below it.
    floor = profile.busiest(cache.stages(*shape), m, cache.splits_backward(*shape))
    if run.makespan < floor:
        idle = config.pp * floor - sum(run.busy)
        bubble = Bubble(of_step=idle / (config.pp * floor), vs_ideal=idle / sum(run.busy))
        run = replace(run, makespan=floor, bubble=bubble)

    tail = (0.0, 0.0)  # (exposed DP, optimizer) of the rank that finishes last
    dp_total = 0.0
    for size in sizes:
        reduce_s, gather_s, optimizer = _rank_tail(cluster, config, training, size.trainable, c)
        dp_total = max(dp_total, reduce_s + gather_s)
        if c.param_gather_overlap and gather_s > 0:
            gather_s = _exposed_gather(gather_s, size, layers, profile)
        if _overlaps_dp(training):
            total_layers = sum(layers[s] for s in size.stages) or 1
            free = -run.makespan  # times relative to the end of the pipeline
            last_chunk = 0.0
            for stage in sorted(size.stages, key=lambda s: -run.stage_slack[s]):
                share = layers[stage] / total_layers
                start = -run.stage_slack[stage]
                if config.pp == 1:  # layer buckets fill during the last backward
                    start -= profile.backward[stage]
                    last_chunk = reduce_s * share / max(1, layers[stage])
                free = max(free, start) + reduce_s * share
            exposed = max(0.0, free, last_chunk) if reduce_s > 0 else 0.0
        else:
            exposed = reduce_s
        if exposed + gather_s + optimizer > sum(tail):
            tail = (exposed + gather_s, optimizer)
    embedding_sync = embedding_sync_time(model, cluster, training, config, c)
    gather, scatter = profile.fsdp
    if gather or scatter:  # all of it inside the micro-batches (hidden or not)
        dp_total = m * max(size.blocks for size in sizes) * (2 * gather + scatter)

    busiest = max(range(config.pp), key=lambda r: run.busy[r])
    tp_per_block = block.tp_comm + (block.forward_tp_comm if config.recompute == "full" else 0.0)
    tp_comm = m * tp_per_block * sum(layers[s] for s in sizes[busiest].stages)
    return StepTime(
        step_s=run.makespan + sum(tail) + embedding_sync,
        compute_s=run.busy[busiest] - tp_comm,
        tp_comm_s=tp_comm,
        bubble_s=run.makespan - run.busy[busiest],
        dp_exposed_s=tail[0],
        optimizer_s=tail[1],
        embedding_sync_s=embedding_sync,
        dp_total_s=dp_total,
        pp_p2p_s=2.0 * sum(hops),
        bubble=run.bubble,
        block=block,
    )
