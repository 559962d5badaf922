"""Evaluate one plan: check it, size its memory, time its step, derive throughput and MFU.

``evaluate(model, cluster, training, config)`` returns a :class:`Plan` with the memory
breakdown of the most loaded GPU, the step-time breakdown and the figures users compare.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property

from stagewise.errors import PlanError
from stagewise.plan.constants import DEFAULT_CONSTANTS, Constants
from stagewise.plan.flops import (
    hardware_flops_per_token,
    lower_bound_flops_per_token,
    model_flops_per_token,
)
from stagewise.plan.hardware import Cluster
from stagewise.plan.kernels import gemm_peak
from stagewise.plan.memory import (
    GIB,
    MemoryBreakdown,
    adapter_extra_weight_bytes,
    layer_state_bytes_per_param,
)
from stagewise.plan.models import ModelSpec
from stagewise.plan.pipeline_cache import PipelineCache
from stagewise.plan.rank import (
    LOGIT_BYTES,
    RankSizes,
    fp8_weight_bytes,
    rank_memory,
    rank_sizes,
)
from stagewise.plan.spec import ParallelConfig, TrainingSpec, stage_layers, stage_slots
from stagewise.plan.steptime import (
    StageProfile,
    StepTime,
    stage_profile,
    step_time,
    tail_floor,
)
from stagewise.schedules import get

__all__ = ["Plan", "check_config", "evaluate", "lower_bound_step_time"]


@dataclass(frozen=True)
class Plan:
    """A parallel configuration with its predicted memory and speed.

    The step time is computed when first read (a search times only the plans that fit, and
    the others when a picture or a listing asks for them).
    """

    model: ModelSpec
    cluster: Cluster
    training: TrainingSpec
    config: ParallelConfig
    num_microbatches: int
    layers: tuple[int, ...]
    memory: MemoryBreakdown
    estimate: Callable[[], StepTime] = field(repr=False, compare=False)
    bound: Callable[[], float] = field(repr=False, compare=False)

    @cached_property
    def time(self) -> StepTime:
        """The step-time breakdown."""
        return self.estimate()

    @cached_property
    def lower_bound_s(self) -> float:
        """A cheap bound the step time cannot beat: the busiest rank's compute with its fill
        and drain, then the optimizer step and what else follows the pipeline."""
        return self.bound()

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.cluster.gpu.memory_gib * GIB

    @property
    def headroom_gib(self) -> float:
        """Device memory left free at the peak, GiB (negative when the plan does not fit)."""
        return self.cluster.gpu.memory_gib - self.memory.total / GIB

    def at_risk(self, margin_gib: float) -> bool:
        """Fits, but with less than ``margin_gib`` GiB to spare."""
        return self.fits and self.headroom_gib < margin_gib

    @property
    def reason(self) -> str | None:
        """Why the plan does not fit (None when it does)."""
        if self.fits:
            return None
        parts = self.memory.in_gib()
        total = parts.pop("total")
        biggest = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
        listing = ", ".join(f"{name} {value:.1f}" for name, value in biggest)
        return (
            f"needs {total:.1f} GiB on pipeline rank {self.memory.rank} ({listing}) but "
            f"{self.cluster.gpu.name} has {self.cluster.gpu.memory_gib:g} GiB"
        )

    @property
    def tokens_per_step(self) -> int:
        return self.training.global_batch * self.training.seq_len

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.time.step_s

    @property
    def model_flops(self) -> float:
        """Model FLOPs of one step (see :data:`stagewise.plan.flops.MODEL_FLOPS_NAME`)."""
        per_token = model_flops_per_token(self.model, self.training.seq_len, self.training.mode)
        return per_token * self.tokens_per_step

    @property
    def tflops_per_gpu(self) -> float:
        """Model TFLOP/s per GPU."""
        return self.model_flops / self.time.step_s / self.cluster.num_gpus / 1e12

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation against the GPU's dense BF16 peak."""
        return self.tflops_per_gpu * 1e12 / self.cluster.gpu.peak_flops

    @property
    def hfu(self) -> float:
        """Hardware FLOPs utilisation: recomputation counted."""
        flops = hardware_flops_per_token(
            self.model, self.training.seq_len, self.config.recompute, self.training.mode
        )
        rate = flops * self.tokens_per_step / self.time.step_s / self.cluster.num_gpus
        return rate / self.cluster.gpu.peak_flops

    def run_hours(self, tokens: float) -> float:
        """Wall-clock hours to train on ``tokens`` tokens."""
        return tokens / self.tokens_per_s / 3600.0

    def run_cost(self, tokens: float, price_per_gpu_hour: float) -> float:
        """Cost of training on ``tokens`` tokens at ``price_per_gpu_hour``."""
        return self.run_hours(tokens) * self.cluster.num_gpus * price_per_gpu_hour


def check_config(
    model: ModelSpec, cluster: Cluster, training: TrainingSpec, config: ParallelConfig
) -> None:
    """Raise PlanError (naming the values and the fix) when ``config`` cannot run."""
    t, n = config.tp, cluster.num_gpus
    if training.precision == "fp8":
        gemm_peak(cluster.gpu, fp8=True)  # refuses a GPU without FP8 tensor cores
    if config.num_gpus != n:
        raise PlanError(
            f"tp x pp x dp = {t} x {config.pp} x {config.dp} = {config.num_gpus} but the "
            f"cluster has {n} GPUs: make the product equal {n}"
        )
    if model.heads % t or model.kv_heads % t:
        raise PlanError(
            f"TP={t} does not divide {model.name}'s {model.heads} attention heads and "
            f"{model.kv_heads} key/value heads: choose a TP that divides {model.kv_heads}"
        )
    if model.ffn % t:
        raise PlanError(f"TP={t} does not divide the MLP width {model.ffn}: choose another TP")
    if t > cluster.gpus_per_node:
        raise PlanError(
            f"TP={t} spans nodes of {cluster.gpus_per_node} GPUs: keep TP <= "
            f"{cluster.gpus_per_node} and use PP across nodes"
        )
    config.num_microbatches(training)
    edges = config.layer_split == "edges" and config.num_chunks > 1
    if config.pp * config.num_chunks > stage_slots(model.layers, config.layer_split,
                                                    config.num_chunks):
        slots = f"{model.layers} layers" + (" + the embedding and the loss" if edges else "")
        hint = "" if edges or config.num_chunks == 1 else (
            " (or use layer_split='edges': the embedding and the loss then take a chunk each, "
            f"up to {model.layers + 2} stages)")
        raise PlanError(
            f"pp x num_chunks = {config.pp} x {config.num_chunks} exceeds {slots}: lower pp "
            f"or num_chunks{hint}"
        )
    if training.engine == "deepspeed":
        _check_deepspeed(config, training)
    generator = get(config.schedule)
    if generator.fixed_chunks is not None and config.num_chunks != generator.fixed_chunks:
        raise PlanError(
            f"schedule {config.schedule} runs {generator.fixed_chunks} chunk(s) per rank, "
            f"got num_chunks={config.num_chunks}: pick interleaved-1f1b for num_chunks > 1"
        )


def _check_deepspeed(config: ParallelConfig, training: TrainingSpec) -> None:
    """Raise PlanError for what the deepspeed engine (DeepSpeed's ``PipelineEngine`` with its
    bf16 optimizer, ``TrainingSpec.engine``) does not run: a schedule other than its 1F1B
    ``TrainSchedule`` with one chunk per rank; ZeRO-2/3 ("ZeRO-2 and ZeRO-3 are incompatible
    with pipeline parallelism"); or, training in full over several replicas, a replicated
    optimizer state (``BF16_Optimizer`` shards it over DP: "it implements its own zero stage
    1 equivalent")."""
    if config.schedule != "1f1b" or config.num_chunks != 1:
        raise PlanError(
            f"DeepSpeed's pipeline engine runs only 1F1B with one chunk per rank, got "
            f"{config.schedule} with num_chunks={config.num_chunks}: use --schedule 1f1b "
            "--num-chunks 1, or --engine megatron"
        )
    if config.shards("gradients"):
        raise PlanError(
            f"DeepSpeed's pipeline engine rejects ZeRO-2 and ZeRO-3, got "
            f"dp_sharding={config.dp_sharding!r}: use --dp-sharding optimizer, or --engine "
            "megatron"
        )
    if training.mode == "full" and config.dp > 1 and not config.shards("optimizer"):
        raise PlanError(
            "DeepSpeed's bf16 optimizer shards the optimizer state over DP (its own ZeRO-1), "
            "got dp_sharding='none': use --dp-sharding optimizer"
        )


def evaluate(
    model: ModelSpec,
    cluster: Cluster,
    training: TrainingSpec,
    config: ParallelConfig,
    constants: Constants = DEFAULT_CONSTANTS,
    cache: PipelineCache | None = None,
) -> Plan:
    """Predict memory and step time of ``config``.

    Raises:
        PlanError: the configuration cannot run (see :func:`check_config`).
        ScheduleError: the schedule cannot be built for these sizes.

    Example:
        >>> from stagewise.plan import Cluster, get_gpu, get_model
        >>> plan = evaluate(get_model("llama-2-7b"), Cluster(get_gpu("h100"), 1, 8),
        ...                 TrainingSpec(seq_len=4096, global_batch=32),
        ...                 ParallelConfig.of(tp=2, pp=2, dp=2, micro_batch_size=1))
        >>> plan.fits, plan.num_microbatches
        (True, 16)
    """
    check_config(model, cluster, training, config)
    if config.tp == 1 and config.sequence_parallel:
        config = replace(config, sequence_parallel=False)
    cache = cache or PipelineCache()
    cache.bind((model, cluster, training, constants))
    m = config.num_microbatches(training)
    layers = stage_layers(model.layers, config.pp * config.num_chunks, config.layer_split,
                          config.num_chunks)
    shape = (config.schedule, config.pp, m, config.num_chunks)
    placement, stages = cache.placement(*shape), cache.stages(*shape)
    # Memo keys name exactly the knobs each quantity reads (model, cluster, training and
    # constants are fixed by cache.bind), so configurations differing elsewhere share it.
    knobs = (config.tp, config.micro_batch_size, config.recompute, config.sequence_parallel)
    sizes_key = ("sizes", *knobs, layers, stages)
    sizes = cache.memo(
        sizes_key, lambda: rank_sizes(model, training, config, layers, stages)
    )
    memory = _most_loaded(
        model, training, config, layers, (sizes_key, sizes), cache, m, constants,
        cluster.gpu.memory_gib,
    )
    profile_key = ("profile", *knobs, config.dp, config.dp_sharding, layers, placement)

    def costs() -> StageProfile:
        return cache.memo(profile_key, lambda: stage_profile(
            model, cluster, training, config, layers, placement, constants
        ))

    def estimate() -> StepTime:
        return step_time(
            model, cluster, training, config, layers, sizes, cache, constants, costs()
        )

    def busiest() -> float:
        splits = cache.splits_backward(config.schedule, config.pp, m, config.num_chunks)
        return costs().busiest(stages, m, splits)

    def bound() -> float:
        pipeline = cache.memo(("busiest", profile_key, shape), busiest)
        floor = cache.memo(
            ("tail", sizes_key, config.dp, config.pp, config.dp_sharding),
            lambda: tail_floor(model, cluster, training, config, sizes, constants),
        )
        return pipeline + floor

    return Plan(model, cluster, training, config, m, layers, memory, estimate, bound)


def _most_loaded(
    model: ModelSpec,
    training: TrainingSpec,
    config: ParallelConfig,
    layers: tuple[int, ...],
    keyed_sizes: tuple[tuple[object, ...], list[RankSizes]],
    cache: PipelineCache,
    m: int,
    constants: Constants,
    memory_gib: float,
) -> MemoryBreakdown:
    """The memory of the rank that needs the most (the first such rank).

    Only model states, activations and the last stage's logits differ between ranks (the
    recompute buffer, communication buffers and reserve do not), so ranks are compared on
    those and the breakdown is built for the winner alone. ``keyed_sizes`` is the ranks'
    sizes and their memo key: the ranks' peak activations are memoised by it and the
    schedule's shape, the winner also by the bytes per parameter.
    """
    sizes_key, sizes = keyed_sizes
    state_bytes = layer_state_bytes_per_param(training, config)
    # a trainable parameter's states, LoRA's fp32 adapter bytes included (as rank_memory)
    per_param = sum(state_bytes) + adapter_extra_weight_bytes(training, config)
    weight_b = state_bytes[0]
    shape = (config.schedule, config.pp, m, config.num_chunks)

    def most_loaded() -> int:
        peaks = cache.memo(  # every rank's stage_bytes is the same tuple (one per stage)
            ("peaks", sizes_key, shape),
            lambda: cache.peak_activation_bytes_by_rank(*shape, sizes[0].stage_bytes),
        )
        logits = (
            config.micro_batch_size * training.seq_len * model.padded_vocab(config.tp)
            / config.tp * LOGIT_BYTES
        )
        rank, most = 0, -math.inf
        for size in sizes:  # the first of equals wins
            states = per_param * size.trainable + weight_b * (size.params - size.trainable)
            states += fp8_weight_bytes(model, training, config, size)
            varying = states + peaks[size.rank]
            if size.last:
                varying += logits
            if varying > most:
                rank, most = size.rank, varying
        return rank

    rank = cache.memo(("most loaded", sizes_key, shape, per_param, weight_b), most_loaded)
    return rank_memory(model, training, config, sizes[rank], cache, m, constants, memory_gib)


def lower_bound_step_time(model: ModelSpec, cluster: Cluster, training: TrainingSpec) -> float:
    """Seconds a step needs at least: its fewest FLOPs at every GPU's dense peak, nothing else."""
    tokens = training.global_batch * training.seq_len
    flops = lower_bound_flops_per_token(model, training.seq_len, training.mode) * tokens
    return flops / (cluster.num_gpus * cluster.gpu.peak_flops)

