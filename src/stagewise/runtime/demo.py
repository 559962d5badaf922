"""The training demo behind ``stagewise train``: a tiny GPT on generated data, any schedule.

:func:`train_rank` runs on every rank (launched locally or by torchrun). It trains, times every
action, counts the bytes saved for backward, and gathers everything on rank 0, which builds a
:class:`TrainReport`: losses, step times, tokens/s, the measured bubble beside the simulator's
prediction from the measured per-stage costs, and activation memory measured and predicted.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from stagewise.errors import ConfigError
from stagewise.runtime.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rank_layers,
    save_checkpoint,
)
from stagewise.runtime.checkpoint_folders import checkpoint_step, complete_checkpoints
from stagewise.runtime.launch import RankContext
from stagewise.runtime.measure import (
    link_latency,
    measured_costs,
    measured_timeline,
    peak_saved_bytes,
)
from stagewise.runtime.mesh import (
    MeshSpec,
    OverlappedAverage,
    average_gradients,
    average_loss,
    build_mesh,
    check_shard_replicas,
    replica_slice,
    shard_replicas,
)
from stagewise.runtime.model_parts import ModelParts, stage_ties, tiny_gpt_parts
from stagewise.runtime.partition import balance, partition, stages_for_rank
from stagewise.runtime.pipeline import Pipeline
from stagewise.runtime.recompute import recomputed
from stagewise.runtime.tiny_gpt import GPTConfig
from stagewise.schedules.ir import Action, Schedule
from stagewise.sim.costs import Link
from stagewise.sim.simulate import simulate
from stagewise.sim.timeline import Event, Timeline

__all__ = ["TrainConfig", "TrainReport", "train_rank"]


@dataclass(frozen=True)
class TrainConfig:
    """What the demo trains and how.

    Attributes:
        schedule: the schedule every rank runs.
        steps: optimizer steps.
        batch_size: sequences per step (split into the schedule's micro-batches).
        model: the tiny GPT's sizes.
        lr: AdamW learning rate.
        partition: how layers are cut into stages (``even``, ``params``, ``time``).
        check_finite: stop at a NaN or infinite loss.
        timeout: seconds any wait for another rank may take.
        seed: model and data seed.
        progress: show a progress bar and a line per step (on the last stage's rank).
        mesh: pipeline x data parallelism (``pp * dp`` ranks; ``batch_size`` is the global
            batch, split evenly over the ``dp`` replicas); None for one pipeline.
        model_spec: which model: ``"tiny"`` (the tiny GPT of ``model``), ``"hf:llama"``,
            ``"hf:gpt2"`` or ``"py:package.module:function"`` (see ``runtime.models``).
        model_config: a Hugging Face config (dict of fields, or a config.json path) for
            ``hf:`` models; None for a tiny default.
        split_names: for ``py:`` models, the submodules in the order they run.
        recompute: full activation recomputation (each layer keeps only its input).
        checkpoint_dir: where checkpoints go (``runtime.checkpoint``); None for none.
        save_every: write a checkpoint after every this many steps (0: never).
        resume: continue from the newest complete checkpoint in ``checkpoint_dir``.
        keep: keep only this many newest checkpoints (None: all).
        device: ``"cpu"`` or ``"cuda"`` (each rank on GPU ``LOCAL_RANK``, or its rank when
            launched locally; the process group must then be NCCL: see ``backend``).
    """

    schedule: Schedule
    steps: int = 30
    batch_size: int = 16
    model: GPTConfig = field(default_factory=lambda: GPTConfig(layers=6))
    lr: float = 3e-3
    partition: str = "params"
    check_finite: bool = False
    timeout: float = 60.0
    seed: int = 0
    progress: bool = True
    mesh: MeshSpec | None = None
    model_spec: str = "tiny"
    model_config: Mapping[str, Any] | str | None = None
    split_names: tuple[str, ...] = ()
    recompute: bool = False
    checkpoint_dir: str | None = None
    save_every: int = 0
    resume: bool = False
    keep: int | None = None
    device: str = "cpu"
    _num_layers: int | None = field(default=None, init=False, repr=False, compare=False)

    def parts(self, empty: bool = False) -> ModelParts:
        """Build the model (the same weights on every call: they come from ``seed``).

        ``empty``: a Hugging Face model's parameters stay on the meta device (no memory) until
        ``parts.materialize`` fills those a rank keeps; other models are built whole.
        """
        if self.model_spec == "tiny":
            return tiny_gpt_parts(self.model, seed=self.seed)
        from stagewise.runtime.models import resolve_model

        return resolve_model(
            self.model_spec, config=self.model_config, seed=self.seed,
            seq_len=self.model.seq_len, names=self.split_names or None, empty=empty,
        )

    def num_layers(self) -> int:
        """Layers the partitioner can cut between (embedding and head included)."""
        assert self._num_layers is not None  # set by __post_init__
        return self._num_layers

    @property
    def world_size(self) -> int:
        """Processes the run needs: the schedule's ranks x data-parallel replicas x tp."""
        return self.schedule.num_ranks * self.replicas * self.tensor_parallel

    @property
    def tensor_parallel(self) -> int:
        """Tensor-parallel ranks per pipeline rank (1 without a mesh)."""
        return self.mesh.tp if self.mesh is not None else 1

    def mesh_text(self) -> str:
        """The mesh as ``pp=2,dp=2,tp=2`` (the schedule's ranks alone without a mesh)."""
        if self.mesh is None:
            return f"pp={self.schedule.num_ranks}"
        dp = "fsdp" if self.mesh.dp_shard else "dp"
        return f"pp={self.mesh.pp},{dp}={self.mesh.dp},tp={self.mesh.tp}"

    def _check_checkpoints(self, folder: str) -> None:
        """Checkpoint settings that would fail inside the ranks: refuse them before launch."""
        if self.keep is not None and self.keep < 1:
            raise ConfigError(f"--keep must be >= 1 checkpoints, got {self.keep}")
        if self.resume:
            path = latest_checkpoint(folder, required=True)
            assert path is not None
            step = checkpoint_step(path)
            if self.steps - step < 2:
                raise ConfigError(
                    f"the checkpoint {str(path)!r} is at step {step} of {self.steps}: fewer "
                    f"than 2 steps are left (the first is warm-up); raise --steps above "
                    f"{step + 1}"
                )
        elif self.save_every:
            later = [p for n, p in complete_checkpoints(Path(folder)) if n > self.save_every]
            if later:
                raise ConfigError(
                    f"{folder!r} already holds {later[-1].name}, a later step than this run's "
                    f"first save (step {self.save_every}): pass --resume to continue it, or use "
                    "an empty --checkpoint-dir"
                )

    @property
    def backend(self) -> str:
        """The process group's backend for ``device``: gloo on CPU, NCCL on CUDA."""
        return "nccl" if self.device == "cuda" else "gloo"

    def _check_device(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device {self.device!r}: choose cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                "--device cuda but this machine has no CUDA GPU that torch can use (or the "
                "installed torch is a CPU build): use --device cpu"
            )

    @property
    def replicas(self) -> int:
        """Data-parallel replicas (1 without a mesh)."""
        return self.mesh.dp if self.mesh is not None else 1

    def __post_init__(self) -> None:
        # The model has an embedding, the blocks and a head: fail here, before any rank starts.
        self._check_device()
        # The model is built once here, without weights (a Hugging Face model's parameters
        # stay on the meta device): enough for its layer count, shapes and ties.
        parts = self.parts(empty=True)
        object.__setattr__(self, "_num_layers", len(parts.layers))
        balance([1.0] * self.num_layers(), self.schedule.num_stages)
        if self.tensor_parallel > 1:
            from torch import nn

            from stagewise.runtime.tensor_parallel import check_tensor_parallel

            blocks = check_tensor_parallel(nn.Sequential(*parts.layers), self.tensor_parallel)
            if blocks == 0:
                raise ConfigError(
                    f"tp={self.tensor_parallel} but model {self.model_spec!r} has no block "
                    "stagewise can shard (attention with q/k/v/o projections and a two- or "
                    "three-matrix MLP): it would run whole on every tp rank; use tp=1"
                )
        if self.mesh is not None and self.mesh.dp_shard:
            check_shard_replicas(self.schedule, parts.ties)
        if (self.save_every or self.resume) and not self.checkpoint_dir:
            raise ConfigError("saving or resuming checkpoints needs a folder: pass "
                              "--checkpoint-dir DIR")
        if self.save_every < 0:
            raise ConfigError(f"save_every must be >= 0 steps, got {self.save_every}")
        if self.steps < 2:
            raise ConfigError(f"steps must be >= 2 (the first step is warm-up), got {self.steps}")
        if self.checkpoint_dir is not None:
            self._check_checkpoints(self.checkpoint_dir)
        if self.mesh is not None:
            if self.mesh.pp != self.schedule.num_ranks:
                raise ConfigError(
                    f"mesh pp={self.mesh.pp} but schedule {self.schedule.name!r} has "
                    f"{self.schedule.num_ranks} ranks: build the schedule with "
                    f"{self.mesh.pp} ranks"
                )
            if self.batch_size % self.mesh.dp:
                raise ConfigError(
                    f"batch size {self.batch_size} does not split evenly over dp="
                    f"{self.mesh.dp} replicas: use a multiple of {self.mesh.dp}"
                )
            if self.batch_size // self.mesh.dp < self.schedule.num_microbatches:
                raise ConfigError(
                    f"each of the dp={self.mesh.dp} replicas gets "
                    f"{self.batch_size // self.mesh.dp} sequences, fewer than the "
                    f"{self.schedule.num_microbatches} micro-batches: raise --batch-size or "
                    "lower --microbatches"
                )
        if self.batch_size < self.schedule.num_microbatches:
            raise ConfigError(
                f"batch size {self.batch_size} is smaller than the {self.schedule.num_microbatches}"
                " micro-batches: raise --batch-size or lower --microbatches"
            )


@dataclass
class TrainReport:
    """Everything the demo measured (rank 0 builds it; ``asdict`` gives the --json output)."""

    schedule: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    steps: int
    tokens_per_step: int
    losses: list[float]
    step_seconds: list[float]
    tokens_per_second: float
    measured_step: float
    predicted_step: float
    measured_bubble: dict[str, float]
    predicted_bubble: dict[str, float]
    measured_activation_bytes: list[int]
    predicted_activation_bytes: list[float]
    stage_costs: dict[str, list[float]]
    link_latency: float
    timeline: Timeline = field(repr=False)
    predicted: Timeline = field(repr=False)
    mesh: dict[str, int | bool] | None = None
    resumed_from: int | None = None
    device: str = "cpu"

    def as_json(self) -> dict[str, Any]:
        """The report without the timelines, for ``--json``."""
        data = asdict(self)
        data.pop("timeline")
        data.pop("predicted")
        return data


def train_rank(context: RankContext, config: TrainConfig) -> TrainReport | None:
    """Train on this rank; rank 0 returns the report, the others None.

    With a mesh, each replica runs the pipeline over its pp group on its slice of the global
    batch; gradients are averaged over the dp group stage by stage, each stage's reduction
    started as soon as this rank finished its gradients (see ``OverlappedAverage``), and the
    loss after the step.
    """
    schedule = config.schedule
    if context.world_size != config.world_size:
        what = f"schedule {schedule.name!r}" if config.mesh is None else (
            f"mesh {config.mesh_text()}"
        )
        raise ConfigError(
            f"{what} needs {config.world_size} ranks but "
            f"{context.world_size} were started: start {config.world_size} processes"
        )
    if config.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", context.rank))
        torch.cuda.set_device(local % torch.cuda.device_count())
    groups = build_mesh(config.mesh, config.device) if config.mesh is not None else None
    pp_rank = groups.pp_rank if groups is not None else context.rank
    dp_rank = groups.dp_rank if groups is not None else 0
    tp_rank = groups.tp_rank if groups is not None else 0
    torch.manual_seed(config.seed)
    # A Hugging Face model is built without weights; this rank fills only its own stages.
    parts = config.parts(empty=config.partition != "time")
    # A replica's micro-batch is the first rows of the global batch's first micro-batch.
    sample, _ = _batch(parts, config, 0)
    sample = sample[: config.batch_size // config.replicas // schedule.num_microbatches]
    stages = partition(list(parts.layers), schedule.num_stages, config.partition, sample)
    sizes = [len(stage) for stage in stages]
    if config.recompute:
        stages = [recomputed(stage) for stage in stages]
    mine = stages_for_rank(schedule, stages, pp_rank)
    # Layer by layer: fill it (an empty build), move it, shard it over tp; so a rank holds
    # at most one whole layer beside its shards.
    from stagewise.runtime.tensor_parallel import apply_tensor_parallel

    for module in mine.values():
        for layer in module.children():
            if parts.materialize is not None:
                parts.materialize([layer])
            if config.device == "cuda":
                layer.to(torch.cuda.current_device())
            if groups is not None and config.tensor_parallel > 1:
                apply_tensor_parallel(layer, groups.tp_mesh)
    sharded = groups is not None and groups.spec.dp_shard
    if sharded:
        assert groups is not None
        # FSDP2 over dp: its reduce-scatter averages the gradients, so no reducer below.
        shard_replicas(mine, groups, schedule, stage_ties(parts.ties, sizes))
    ties = stage_ties(parts.ties, sizes)
    reducer = None
    on_action = context.report_action
    # Tied copies get their summed gradient at the end of the step, after an overlapped
    # reduction would have started: with ties, average after the step instead.
    if groups is not None and not ties and not sharded:
        reducer = OverlappedAverage(schedule, pp_rank, mine, groups.dp_group)

        def on_action(action: Action) -> None:
            context.report_action(action)
            assert reducer is not None
            reducer.on_action(action)

    pipe = Pipeline(
        schedule, mine, parts.loss_fn, group=groups.pp_group if groups is not None else None,
        timeout=config.timeout, check_finite=config.check_finite,
        store=context.store, count_saved=True, on_action=on_action,
        tied=ties,
    )
    params = [p for module in mine.values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    shows = config.progress and schedule.num_stages - 1 in mine and dp_rank == tp_rank == 0
    layers = rank_layers(mine, sizes)
    first_step, losses = _resume(config, layers, optimizer)
    if schedule.num_stages - 1 not in mine:
        losses = []  # only the ranks holding the last stage report losses
    bar = _progress_bar(config.steps - first_step) if shows else None
    tokens = config.batch_size * parts.seq_len
    step_seconds: list[float] = []
    recorded: list[tuple[list[Event], dict[tuple[int, int], int]]] = []
    for step in range(first_step, config.steps):
        start = time.perf_counter()
        inputs, targets = _batch(parts, config, step)
        if groups is not None:
            inputs = replica_slice(inputs, config.replicas, dp_rank)
            targets = replica_slice(targets, config.replicas, dp_rank)
        loss = pipe.step(inputs, targets)
        if groups is not None:
            if reducer is not None:
                reducer.finish()
            elif not sharded:
                average_gradients(mine.values(), groups.dp_group)
            if loss is not None:
                loss = average_loss(loss, groups.dp_group)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - start)
        if step > first_step:
            recorded.append((list(pipe.events), dict(pipe.saved_bytes)))
        if loss is not None:
            losses.append(float(loss))
        if config.save_every and (step + 1) % config.save_every == 0:
            assert config.checkpoint_dir is not None
            save_checkpoint(config.checkpoint_dir, step + 1, layers, optimizer,
                            extra=None if loss is None else {"losses": losses}, keep=config.keep)
        if loss is not None and bar is not None:
            seconds = step_seconds[-1]
            bar.set_postfix_str(f"loss {losses[-1]:.3f}  {seconds * 1e3:.0f} ms  "
                                f"{tokens / seconds:,.0f} tok/s")
            bar.write(f"step {step + 1:>4}  loss {losses[-1]:7.4f}  step {seconds:.3f} s  "
                      f"{tokens / seconds:9,.0f} tokens/s")
            bar.update(1)
    if bar is not None:
        bar.close()
    mine_data = (pp_rank, losses, step_seconds, recorded, dp_rank + tp_rank)
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, mine_data)
    if context.rank != 0:
        return None
    return _report(config, gathered, tokens, first_step)


def _resume(
    config: TrainConfig, layers: dict[int, torch.nn.Module], optimizer: torch.optim.Optimizer
) -> tuple[int, list[float]]:
    """The step to start from and the losses before it: 0 and none unless resuming."""
    if not config.resume:
        return 0, []
    assert config.checkpoint_dir is not None
    path = latest_checkpoint(config.checkpoint_dir, required=True)
    assert path is not None
    state = load_checkpoint(path, layers, optimizer)
    for group in optimizer.param_groups:
        group["lr"] = config.lr  # this run's --lr, not the checkpoint's
    # TrainConfig checked before launch that at least 2 steps are left after this one.
    return state["step"], list(state["extra"].get("losses", []))


def _batch(parts: ModelParts, config: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s global batch: a function of the seed and the step alone (so a resumed
    run sees the data an uninterrupted one would), the same with or without a mesh."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step + 1)
    return parts.make_batch(config.batch_size, generator)


def _progress_bar(steps: int) -> Any:
    import threading

    from tqdm import tqdm

    # tqdm's default lock includes a multiprocessing semaphore that a rank, ending with
    # os._exit, would leave behind (the launcher's resource tracker then warns about a leak).
    tqdm.set_lock(threading.RLock())
    # The bar only on a terminal (disable=None); the per-step lines always, on stdout.
    return tqdm(
        total=steps, desc="training", unit="step", file=sys.stderr, leave=False, disable=None
    )


def _report(
    config: TrainConfig, gathered: list[Any], tokens: int, first_step: int
) -> TrainReport:
    schedule = config.schedule
    losses = next(g[1] for g in gathered if g[1])
    # Step time as the slowest rank saw it, per step.
    ran = config.steps - first_step
    step_seconds = [max(g[2][i] for g in gathered) for i in range(ran)]
    # Timelines and memory from the first replica's first tp shard (the others run the same).
    gathered = [g for g in gathered if g[4] == 0]
    timelines, saved_per_step = [], []
    for step in range(ran - 1):
        events = [e for g in gathered for e in g[3][step][0]]
        saved: dict[tuple[int, int], int] = {}
        for g in gathered:
            saved.update(g[3][step][1])
        timelines.append(measured_timeline(schedule, events, saved))
        saved_per_step.append(saved)
    # The step of median length stands for the run (pictures, bubble, memory).
    order = sorted(range(len(timelines)), key=lambda i: timelines[i].makespan)
    typical = order[len(order) // 2]
    timeline, saved = timelines[typical], saved_per_step[typical]
    costs = measured_costs(timelines)
    latency = link_latency(timelines)
    predicted = replace(simulate(schedule, costs, Link(latency=latency)), time_unit="s")
    measured_bubble, predicted_bubble = timeline.bubble(), predicted.bubble()
    return TrainReport(
        schedule=schedule.name,
        num_ranks=schedule.num_ranks,
        num_stages=schedule.num_stages,
        num_microbatches=schedule.num_microbatches,
        steps=config.steps,
        tokens_per_step=tokens,
        losses=losses,
        step_seconds=step_seconds,
        tokens_per_second=tokens / statistics.median(step_seconds[1:]),
        measured_step=statistics.median(t.makespan for t in timelines),
        predicted_step=predicted.makespan,
        measured_bubble={"of_step": measured_bubble.of_step, "vs_ideal": measured_bubble.vs_ideal},
        predicted_bubble={
            "of_step": predicted_bubble.of_step, "vs_ideal": predicted_bubble.vs_ideal
        },
        measured_activation_bytes=[
            peak_saved_bytes(timeline, saved, r) for r in range(schedule.num_ranks)
        ],
        predicted_activation_bytes=[
            predicted.peak_activations(r, in_bytes=True) for r in range(schedule.num_ranks)
        ],
        stage_costs={
            "forward": list(costs.forward),
            "backward": list(costs.backward),
            "weight": list(costs.weight),
        },
        link_latency=latency,
        timeline=timeline,
        predicted=predicted,
        resumed_from=first_step or None,
        device=config.device,
        mesh=None if config.mesh is None else {
            "pp": config.mesh.pp, "dp": config.mesh.dp, "tp": config.mesh.tp,
            "fsdp": config.mesh.dp_shard,
        },
    )
