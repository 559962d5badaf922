"""The trainer: :func:`train` launches the ranks, :func:`train_rank` is what each one runs.

``train_rank`` is a sequence of named steps: join the mesh, build this rank's stages, wrap them
for data parallelism, resume, run the steps, gather every rank's :class:`RankResult` on rank 0,
which builds the :class:`TrainReport` (losses, step times, tokens/s, the measured bubble beside
the simulator's prediction from the measured per-stage costs, activation memory measured and
predicted).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import torch
import torch.distributed as dist

from stagewise.errors import ConfigError, RuntimeFailure
from stagewise.runconfig import RunConfig
from stagewise.runtime.checkpoint.export import save_model_files
from stagewise.runtime.checkpoint.state import rank_layers
from stagewise.runtime.engine.launch import RankContext, launch, torchrun_context
from stagewise.runtime.engine.pipeline import Pipeline
from stagewise.runtime.engine.precision import float_loss
from stagewise.runtime.models.model_parts import LossFn
from stagewise.runtime.parallel.mesh import MeshGroups, build_mesh
from stagewise.train.batches import IGNORE, Batches, load_data
from stagewise.train.job import Job, model_parts
from stagewise.train.loop import Trainer, resume
from stagewise.train.metrics import state_bytes
from stagewise.train.optim import GradAccumulation, param_groups
from stagewise.train.report import TrainReport, build_report
from stagewise.train.results import RankResult
from stagewise.train.stages import RankModel, build_stages, wrap_parallel
from stagewise.train.telemetry import Telemetry

__all__ = ["train", "train_local", "train_rank", "train_torchrun"]


def train(job: Job, torchrun: bool) -> TrainReport | None:
    """Run ``job`` on local processes, or as this torchrun process; the report on rank 0.

    With ``--export-hf`` the final checkpoint is written as a Hugging Face folder afterwards
    (by the launcher, or by torchrun's global rank 0).
    """
    report = train_torchrun(job) if torchrun else train_local(job)
    checkpoint = job.config.checkpoint
    if report is not None and checkpoint.export_hf is not None:
        assert checkpoint.dir is not None
        written = _export(job)
        report.exported = str(written.out)
        if job.temporary_checkpoints:
            shutil.rmtree(checkpoint.dir, ignore_errors=True)
    return report


def _export(job: Job) -> Any:
    """The run's final checkpoint as a Hugging Face folder (a peft adapter folder for LoRA)."""
    checkpoint = job.config.checkpoint
    assert checkpoint.dir is not None
    assert checkpoint.export_hf is not None
    if job.config.training.lora is not None:
        from stagewise.runtime.checkpoint.export_lora import export_lora

        return export_lora(checkpoint.dir, checkpoint.export_hf, force=True)
    from stagewise.runtime.checkpoint.export import export_checkpoint

    return export_checkpoint(checkpoint.dir, checkpoint.export_hf, force=True)


def train_rank(context: RankContext, job: Job) -> TrainReport | None:
    """Train on this rank; rank 0 returns the report, the others None.

    With a mesh, each replica runs the pipeline over its pp group on its slice of the global
    batch; gradients are averaged over the dp group stage by stage, each stage's reduction
    started as soon as this rank finished its gradients (see ``OverlappedAverage``), and the
    loss after the step.
    """
    groups = _join(context, job)
    pp_rank = groups.pp_rank if groups is not None else context.rank
    result = RankResult(pp_rank, groups.dp_rank if groups is not None else 0,
                        groups.tp_rank if groups is not None else 0)
    config = job.config
    torch.manual_seed(config.training.seed)
    # A Hugging Face model is built without weights; this rank fills only its own stages.
    parts = model_parts(config, empty=config.training.partition != "time")
    batches = Batches(config, parts, load_data(config) if config.data.any else None,
                      result.dp_rank)
    model = build_stages(job, parts, groups, pp_rank)
    reducer, on_action = wrap_parallel(job, model, groups, pp_rank, context)
    pipe = Pipeline(
        job.schedule, model.stages, _loss_fn(config, parts.loss_fn),
        group=groups.pp_group if groups is not None else None, timeout=config.launch.timeout,
        check_finite=config.training.check_finite, store=context.store, count_saved=True,
        on_action=on_action, tied=model.ties,
    )
    training = config.training
    optimizer = torch.optim.AdamW(param_groups(model.stages, training.weight_decay),
                                  lr=training.lr)
    layers = _checkpointed_layers(job, model)
    first_step, losses = resume(job, layers, optimizer)
    if job.schedule.num_stages - 1 in model.stages:
        result.losses.extend(losses)  # only the ranks holding the last stage report losses
    if context.rank == 0:
        _save_model_files(job)
    writes = job.schedule.num_stages - 1 in model.stages and result.first_replica
    trainer = Trainer(job, model, pipe, optimizer, layers, groups, reducer, batches,
                      GradAccumulation(model.stages, training.grad_accum),
                      Telemetry(config, parts.seq_len, writes=writes), context)
    trainer.run(result, first_step)
    result.state_bytes = state_bytes(model.parameters(), optimizer)
    gathered: list[RankResult | None] = [None] * context.world_size
    dist.all_gather_object(gathered, result)
    if context.rank != 0:
        return None
    results = [r for r in gathered if r is not None]
    return build_report(job, results, parts.seq_len, first_step)


def _checkpointed_layers(job: Job, model: RankModel) -> dict[int, torch.nn.Module]:
    """The layers checkpoints hold, keyed by model layer: the adapters alone under LoRA."""
    layers = rank_layers(model.stages, model.sizes)
    if job.config.training.lora is None:
        return layers
    from stagewise.runtime.models.lora import adapter_layers

    return adapter_layers(layers)


def _save_model_files(job: Job) -> None:
    """Beside the checkpoints: a model folder's config and tokenizer (and the LoRA spec), so
    ``stagewise export`` can write the run as a Hugging Face (or peft) folder."""
    config = job.config
    folder = config.checkpoint.dir
    if folder is None or not config.model.is_folder:
        return
    save_model_files(folder, config.model.spec)
    if config.training.lora is not None:
        from stagewise.runtime.checkpoint.export_lora import save_lora_spec
        from stagewise.runtime.models.lora import LoraSpec

        save_lora_spec(folder, LoraSpec.parse(config.training.lora), config.model.spec)


def _loss_fn(config: RunConfig, loss_fn: LossFn) -> LossFn:
    """The model's loss, in fp32 under bf16, safe on all-masked micro-batches with data."""
    if config.training.dtype != "fp32":
        loss_fn = float_loss(loss_fn)
    return _masked(loss_fn) if config.data.any else loss_fn


def _masked(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` that gives 0 (with a gradient path) for a micro-batch whose targets are
    all out of the loss (an eval set's padding), where a mean over no token would be NaN."""

    def loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if bool((targets != IGNORE).any()):
            return loss_fn(output, targets)
        return output.sum() * 0.0

    return loss


def _join(context: RankContext, job: Job) -> MeshGroups | None:
    """Check the world, pick this rank's GPU, and build the mesh's groups (None for a plain
    pipeline: the default group is its pipeline group)."""
    mesh = job.config.mesh
    if context.world_size != job.world_size:
        raise ConfigError(
            f"mesh {mesh.text()} needs {job.world_size} ranks but {context.world_size} were "
            f"started: start {job.world_size} processes"
        )
    device = job.config.launch.device
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", context.rank))
        torch.cuda.set_device(local % torch.cuda.device_count())
    if mesh.world_size == mesh.pp and not mesh.dp_shard:
        return None
    return build_mesh(mesh, device)


def train_local(job: Job) -> TrainReport | None:
    """Spawn the job's ranks as local processes; rank 0's report."""
    launch_config = job.config.launch
    backend = local_backend(job) if launch_config.device == "cuda" else launch_config.backend
    limit = launch_config.timeout + 30.0 + job.config.training.steps * 10.0
    results = launch(
        train_rank, job.world_size, (job,), timeout=limit,
        grace=min(launch_config.timeout, 10.0), threads=launch_config.threads,
        step_timeout=launch_config.timeout, names=job.rank_names,
        backend=backend,
    )
    report: TrainReport | None = results[0]
    return report


def train_torchrun(job: Job) -> TrainReport | None:
    """Run this torchrun process's rank; the report on global rank 0, None elsewhere."""
    launch_config = job.config.launch
    torch.set_num_threads(launch_config.threads)
    if launch_config.device == "cuda":
        check_gpus(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), "processes per node")
    context = torchrun_context(launch_config.backend, timeout=launch_config.timeout,
                               names=job.rank_names)
    try:
        report = train_rank(context, job)
    except RuntimeFailure as err:
        # Leave at once, as the local launcher's ranks do: a receive thread may still wait
        # on a rank that is gone, and tearing the process group down under it can abort.
        print(f"stagewise: training failed: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    dist.destroy_process_group()
    return report


def local_backend(job: Job) -> str:
    """NCCL when each local rank has a GPU of its own. A plain pipeline with more ranks than
    GPUs shares them round-robin over gloo (NCCL refuses two ranks on one GPU), so its
    transfers go through host memory, and says so; anything else is refused."""
    gpus = torch.cuda.device_count()
    mesh = job.config.mesh
    if job.world_size <= gpus or gpus == 0 or mesh.world_size != mesh.pp or mesh.dp_shard:
        check_gpus(job.world_size, "local processes")
        return job.config.launch.backend
    print(f"stagewise: {job.world_size} ranks share {gpus} GPU(s): gloo between them, "
          "transfers through host memory (one rank per GPU uses NCCL)",
          file=sys.stderr, flush=True)
    return "gloo"


def check_gpus(ranks: int, what: str) -> None:
    """NCCL cannot put two ranks on one GPU: refuse more ranks than GPUs on this machine."""
    gpus = torch.cuda.device_count()
    if ranks > gpus:
        raise ConfigError(
            f"--device cuda runs one rank per GPU but {ranks} {what} need {ranks} GPUs and "
            f"this machine has {gpus}: use a smaller mesh, or --device cpu (only a plain "
            "local pipeline, without dp, fsdp or tp, shares GPUs)"
        )
