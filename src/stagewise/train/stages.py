"""A rank's share of the model: cut into stages, filled, moved, and wrapped for parallelism."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from stagewise.runtime.engine.launch import RankContext
from stagewise.runtime.engine.partition import partition, stages_for_rank
from stagewise.runtime.engine.precision import autocast_stage, torch_dtype
from stagewise.runtime.engine.recompute import recomputed
from stagewise.runtime.models.model_parts import ModelParts, stage_ties
from stagewise.runtime.parallel.mesh import MeshGroups, OverlappedAverage, shard_replicas
from stagewise.runtime.parallel.tensor_parallel import apply_tensor_parallel
from stagewise.schedules.ir import Action
from stagewise.train.batches import generated_batch
from stagewise.train.job import Job

__all__ = ["RankModel", "build_stages", "wrap_parallel"]


@dataclass
class RankModel:
    """The stages one rank holds.

    Attributes:
        parts: the whole model's description (layers, loss, data, ties, tp plan).
        stages: stage index -> the stage's layers, for this rank's stages.
        sizes: layers in every stage of the model (for checkpoint keys and ties).
        ties: the model's ties as the pipeline's per-stage names.
    """

    parts: ModelParts
    stages: dict[int, nn.Module]
    sizes: list[int]
    ties: list[dict[int, str]]

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter of this rank's stages."""
        return [p for module in self.stages.values() for p in module.parameters()]


def build_stages(job: Job, parts: ModelParts, groups: MeshGroups | None,
                 pp_rank: int) -> RankModel:
    """Cut ``parts`` into the schedule's stages and keep this rank's, ready to run.

    Layer by layer each kept layer is filled (an empty Hugging Face build), moved to the
    device and sharded over tp, so a rank holds at most one whole layer beside its shards.
    """
    config, schedule = job.config, job.schedule
    # A micro-batch of generated data: the shape the time partitioner runs the layers on.
    sample, _ = generated_batch(parts, config.training.seed, 0, config.batch.global_batch)
    sample = sample[: job.rows_per_replica // schedule.num_microbatches]
    stages = partition(list(parts.layers), schedule.num_stages, config.training.partition, sample)
    sizes = [len(stage) for stage in stages]
    if config.training.recompute == "full":
        stages = [recomputed(stage) for stage in stages]
    mine = stages_for_rank(schedule, stages, pp_rank)
    for stage, module in mine.items():
        for position, layer in enumerate(module.children()):
            _prepare_layer(job, parts, layer, sum(sizes[:stage]) + position, groups)
    if config.training.dtype != "fp32":
        device = "cuda" if config.launch.device == "cuda" else "cpu"
        for module in mine.values():
            autocast_stage(module, torch_dtype(config.training.dtype), device)
    return RankModel(parts, mine, sizes, stage_ties(parts.ties, sizes))


def _prepare_layer(job: Job, parts: ModelParts, layer: nn.Module, index: int,
                   groups: MeshGroups | None) -> None:
    """Fill layer ``index`` of the model, add its LoRA adapters, move it, shard it over tp."""
    config = job.config
    if parts.materialize is not None:
        parts.materialize([layer])
    if config.training.lora is not None:
        from stagewise.runtime.models.lora import LoraSpec, apply_lora, cast_frozen

        apply_lora(layer, LoraSpec.parse(config.training.lora), seed=config.training.seed,
                   index=index)
        if config.training.dtype != "fp32":
            # The frozen base needs no fp32 master copy: hold it in the run's dtype.
            cast_frozen(layer, torch_dtype(config.training.dtype))
    if config.launch.device == "cuda":
        layer.to(torch.cuda.current_device())
    if groups is not None and config.mesh.tp > 1:
        apply_tensor_parallel(layer, groups.tp_mesh, parts.tp_plan)


OnAction = Callable[[Action], None]


def wrap_parallel(job: Job, model: RankModel, groups: MeshGroups | None, pp_rank: int,
                  context: RankContext) -> tuple[OverlappedAverage | None, OnAction]:
    """Data parallelism around the stages: FSDP2, or an overlapped gradient average.

    Returns:
        The reducer to finish after each step (None when there is none to run: no replicas,
        FSDP, or ties, which are averaged after the step instead) and the callback the
        pipeline calls before each action.
    """
    if groups is None:
        return None, context.report_action
    if groups.spec.dp_shard:
        # FSDP2 over dp: its reduce-scatter averages the gradients, so no reducer.
        dtype = job.config.training.dtype
        shard_replicas(model.stages, groups, job.schedule, model.ties,
                       param_dtype=None if dtype == "fp32" else torch_dtype(dtype))
        return None, context.report_action
    if model.ties:
        # Tied copies get their summed gradient at the end of the step, after an overlapped
        # reduction would have started: with ties, average after the step instead.
        return None, context.report_action
    reducer = OverlappedAverage(job.schedule, pp_rank, model.stages, groups.dp_group)

    def on_action(action: Action) -> None:
        context.report_action(action)
        reducer.on_action(action)

    return reducer, on_action
