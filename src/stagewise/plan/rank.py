"""What one pipeline rank holds: its stages' parameters and activations, and its memory.

With tied embeddings and more than one pipeline rank, the last stage keeps its own copy of the
embedding matrix for the output head (Megatron-LM does, and all-reduces the two gradients).
LoRA adds r x (inputs + outputs) parameters to every linear of every block; only those train.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stagewise.plan.constants import Constants
from stagewise.plan.layer import BYTES
from stagewise.plan.memory import (
    GIB,
    MemoryBreakdown,
    adapter_extra_weight_bytes,
    layer_activation_bytes,
    layer_state_bytes_per_param,
    lora_first_norm_bytes,
    lora_params_per_block,
)
from stagewise.plan.models import ModelSpec
from stagewise.plan.pipeline_cache import PipelineCache
from stagewise.plan.spec import ParallelConfig, TrainingSpec

__all__ = [
    "LOGIT_BYTES", "RankSizes", "fp8_weight_bytes", "lora_params_per_block", "rank_memory",
    "rank_sizes",
]

LOGIT_BYTES = BYTES + 4  # per logit on the last stage: bf16 logits and their fp32 softmax


@dataclass(frozen=True)
class RankSizes:
    """Parameters and activation sizes of one pipeline rank (per GPU of its TP group).

    Attributes:
        rank: pipeline rank.
        stages: the (virtual) stages it holds.
        params: parameters it holds.
        trainable: parameters with gradients and optimizer state.
        stage_bytes: activation bytes of one micro-batch through each stage of the pipeline.
        first, last: it holds the first / the last stage.
    """

    rank: int
    stages: tuple[int, ...]
    params: float
    trainable: float
    stage_bytes: tuple[float, ...]
    first: bool
    last: bool
    blocks: int = 0


def _stage_bytes(
    model: ModelSpec, training: TrainingSpec, config: ParallelConfig, layers: tuple[int, ...]
) -> tuple[float, ...]:
    per_layer = layer_activation_bytes(model, training, config)
    sbh = config.micro_batch_size * training.seq_len * model.hidden
    shard = config.tp if config.sequence_parallel else 1
    dropout = training.uses_dropout(model)
    lora = training.mode == "lora"
    sizes = []
    for stage, count in enumerate(layers):
        size = count * per_layer
        if stage == 0 and dropout and not lora:
            size += sbh / shard  # embedding dropout mask (LoRA: a frozen embedding's output
            # needs no gradient, so its dropout saves nothing)
        if stage == 0 and count and lora and config.recompute != "full":
            size -= lora_first_norm_bytes(model, training, config)  # its input needs no grad
        if stage == len(layers) - 1:
            size += 2.0 * BYTES * sbh / shard  # final norm input and output
        sizes.append(size)
    return tuple(sizes)


def rank_sizes(
    model: ModelSpec,
    training: TrainingSpec,
    config: ParallelConfig,
    layers: tuple[int, ...],
    rank_stages: Sequence[tuple[int, ...]],
) -> list[RankSizes]:
    """Sizes of every pipeline rank, given the layers of each stage and each rank's stages."""
    t = config.tp
    last_stage = len(layers) - 1
    stage_bytes = _stage_bytes(model, training, config, layers)
    lora = training.mode == "lora"
    adapters = lora_params_per_block(model, training.lora_rank) / t if lora else 0.0
    result = []
    for rank, stages in enumerate(rank_stages):
        blocks = sum(layers[s] for s in stages)
        params = blocks * model.layer_params / t
        edge = 0.0
        first, last = 0 in stages, last_stage in stages
        if first:
            edge += model.embedding_params(t) / t
        if last:
            edge += model.head_params(t) / t
            if model.tied_embeddings and not first:
                edge += model.padded_vocab(t) * model.hidden / t
        trainable = blocks * adapters if lora else params + edge
        result.append(
            RankSizes(rank, stages, params + edge + blocks * adapters, trainable, stage_bytes,
                      first, last, blocks)
        )
    return result


def fp8_weight_bytes(
    model: ModelSpec, training: TrainingSpec, config: ParallelConfig, sizes: RankSizes
) -> float:
    """FP8 copies of the rank's block weights, kept for the step (0 without FP8).

    Transformer Engine casts each GEMM weight once per step and keeps the FP8 weight and its
    transpose (Hopper's FP8 GEMMs need both layouts: forward and input gradient), one byte
    each per matmul parameter of the rank's blocks.
    """
    if training.precision != "fp8":
        return 0.0
    return 2.0 * sizes.blocks * model.layer_matmul_params / config.tp


def rank_memory(
    model: ModelSpec,
    training: TrainingSpec,
    config: ParallelConfig,
    sizes: RankSizes,
    cache: PipelineCache,
    num_microbatches: int,
    c: Constants,
    memory_gib: float,
) -> MemoryBreakdown:
    """Memory of one GPU of pipeline rank ``sizes.rank`` at its activation peak."""
    weight_b, grad_b, optim_b = layer_state_bytes_per_param(training, config)
    frozen = sizes.params - sizes.trainable
    activations = cache.peak_activation_bytes(
        config.schedule, config.pp, num_microbatches, config.num_chunks, sizes.rank,
        sizes.stage_bytes,
    )
    tokens = config.micro_batch_size * training.seq_len
    logits = 0.0
    if sizes.last:
        logits = tokens * model.padded_vocab(config.tp) / config.tp * LOGIT_BYTES
    recompute_buffer = 0.0
    if config.recompute == "full":
        recompute_buffer = layer_activation_bytes(model, training, config, recompute="none")
    activation = BYTES * tokens * model.hidden
    shard = config.tp if config.sequence_parallel else 1
    comm = 0.0
    if config.pp > 1:
        comm += 2.0 * activation / shard  # one receive buffer forward, one backward
    if config.sequence_parallel:
        comm += activation  # the gathered input of a column-parallel GEMM
    if config.shards("weights"):  # FSDP: the block computing and the next one, prefetched
        comm += 2.0 * BYTES * model.layer_params / config.tp
    return MemoryBreakdown(
        weights=weight_b * (sizes.trainable + frozen)
        + adapter_extra_weight_bytes(training, config) * sizes.trainable
        + fp8_weight_bytes(model, training, config, sizes),
        gradients=grad_b * sizes.trainable,
        optimizer=optim_b * sizes.trainable,
        activations=activations,
        logits=logits,
        recompute_buffer=recompute_buffer,
        comm_buffers=comm,
        reserved=(c.reserved_gib + c.fragmentation * memory_gib) * GIB,
        rank=sizes.rank,
    )
