"""The sections of a run configuration as frozen dataclasses, each checked on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from stagewise.errors import ConfigError, ScheduleError
from stagewise.runconfig._toml import _check_type, _positive, _section
from stagewise.runconfig.model import ModelConfig
from stagewise.schedules import build, get, names

__all__ = [
    "RECOMPUTE",
    "BatchConfig",
    "MeshConfig",
    "ModelConfig",
    "RunConfig",
    "ScheduleConfig",
    "SourceInfo",
    "TrainingConfig",
]

RECOMPUTE = ("none", "full")
UNBUILT = ("auto",)  # schedules not built to check a config: auto searches (seconds)


@dataclass(frozen=True)
class MeshConfig:
    """Process grid: ``pp`` pipeline ranks x ``dp`` replicas x ``tp`` tensor-parallel ranks.

    TP is the innermost axis (neighbouring ranks, one node), then PP, then DP.
    """

    pp: int = 1
    dp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for name in ("pp", "dp", "tp"):
            _positive("mesh", name, getattr(self, name))

    @property
    def world_size(self) -> int:
        """Processes the run needs: pp x dp x tp."""
        return self.pp * self.dp * self.tp

    def text(self) -> str:
        """The ``--mesh`` value: ``pp=2,dp=2`` (``,tp=T`` only when T > 1)."""
        return f"pp={self.pp},dp={self.dp}" + (f",tp={self.tp}" if self.tp > 1 else "")


@dataclass(frozen=True)
class ScheduleConfig:
    """The pipeline schedule.

    Attributes:
        name: a registered schedule (``stagewise compare`` lists them).
        chunks: v, virtual stages per pipeline rank (fixed by some schedules: 1 for 1f1b,
            2 for zb-v and dualpipev).
        microbatches: m, micro-batches per replica and step.
    """

    name: str = "1f1b"
    chunks: int = 1
    microbatches: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"[schedule] name must be a string, got {self.name!r}")
        try:
            generator = get(self.name)
        except ScheduleError:
            raise ConfigError(
                f"[schedule] name = {self.name!r} is not a schedule: choose one of "
                f"{', '.join(names())}"
            ) from None
        _positive("schedule", "chunks", self.chunks)
        _positive("schedule", "microbatches", self.microbatches)
        if generator.fixed_chunks is not None and self.chunks != generator.fixed_chunks:
            raise ConfigError(
                f"[schedule] chunks = {self.chunks} but {self.name} runs exactly "
                f"{generator.fixed_chunks} chunk(s) per rank: set chunks = "
                f"{generator.fixed_chunks} or use interleaved-1f1b"
            )

    @property
    def takes_chunks(self) -> bool:
        """Whether the schedule accepts any v (so ``--chunks`` must be passed)."""
        return get(self.name).fixed_chunks is None


@dataclass(frozen=True)
class BatchConfig:
    """Batch sizes: ``global_batch`` = ``micro_batch_size`` x microbatches x dp sequences."""

    global_batch: int = 16
    micro_batch_size: int = 2
    seq_len: int = 32

    def __post_init__(self) -> None:
        for name in ("global_batch", "micro_batch_size", "seq_len"):
            _positive("batch", name, getattr(self, name))


@dataclass(frozen=True)
class TrainingConfig:
    """The optimisation: steps, AdamW learning rate, activation recomputation.

    ``recompute``: ``"none"`` keeps every layer's activations until its backward; ``"full"``
    keeps only each layer's input and runs the layer's forward again inside its backward
    (``torch.utils.checkpoint`` per layer, Megatron's full/uniform with one layer per group).
    """

    steps: int = 30
    lr: float = 3e-3
    recompute: str = "none"

    def __post_init__(self) -> None:
        _positive("training", "steps", self.steps)
        if self.steps < 2:
            raise ConfigError(
                f"[training] steps = {self.steps}: stagewise train needs steps >= 2 (the first "
                "step is warm-up): set steps = 2 or more"
            )
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float):
            raise ConfigError(f"[training] lr must be a number, got {self.lr!r}: write lr = 0.003")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"[training] lr must be a positive number, got {self.lr!r}")
        object.__setattr__(self, "lr", float(self.lr))
        if self.recompute not in RECOMPUTE:
            raise ConfigError(
                f"[training] recompute = {self.recompute!r}: choose one of "
                f"{', '.join(repr(r) for r in RECOMPUTE)}"
            )


@dataclass(frozen=True)
class SourceInfo:
    """What produced the file (for the reader; the trainer ignores it).

    Attributes:
        planner: the command that wrote it.
        model: the planned model's name (``llama-2-70b``).
        gpu: the planned device.
        nodes, gpus_per_node: the planned cluster.
        configuration: the plan in one line (``TP=4 PP=4 DP=2 ... zb-v``).
        predicted_step_s: the planner's step time, seconds.
        memory_per_gpu_gib: the planner's memory on the most loaded GPU, GiB.
        notes: what the run does differently from the plan.
    """

    planner: str = "stagewise plan"
    model: str = ""
    gpu: str = ""
    nodes: int = 1
    gpus_per_node: int = 1
    configuration: str = ""
    predicted_step_s: float = 0.0
    memory_per_gpu_gib: float = 0.0
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.notes, list):
            object.__setattr__(self, "notes", tuple(self.notes))
        for name, kind in _SCHEMA["source"].items():
            _check_type("source", name, getattr(self, name), kind)


@dataclass(frozen=True)
class RunConfig:
    """One training run, complete: ``stagewise train --config`` needs nothing else.

    Checked on construction: every section's values, then the sections together (the batch
    splits into micro-batches, the schedule builds for pp ranks and m micro-batches, the
    stages fit the layers, TP divides the heads, the sequence fits the positions).

    Example:
        >>> config = RunConfig(mesh=MeshConfig(pp=2, dp=2),
        ...                    batch=BatchConfig(global_batch=32, micro_batch_size=2))
        >>> config.train_args()[:4]
        ['--mesh', 'pp=2,dp=2', '--schedule', '1f1b']
    """

    mesh: MeshConfig = field(default_factory=MeshConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    source: SourceInfo | None = None

    def __post_init__(self) -> None:
        mesh, schedule, batch, model = self.mesh, self.schedule, self.batch, self.model
        per_step = batch.micro_batch_size * schedule.microbatches * mesh.dp
        if batch.global_batch != per_step:
            raise ConfigError(
                f"[batch] global_batch = {batch.global_batch} is not micro_batch_size x "
                f"microbatches x dp = {batch.micro_batch_size} x {schedule.microbatches} x "
                f"{mesh.dp} = {per_step}: set global_batch = {per_step} or change the others"
            )
        if schedule.name not in UNBUILT:
            try:
                build(schedule.name, num_ranks=mesh.pp, num_microbatches=schedule.microbatches,
                      num_chunks=schedule.chunks)
            except ScheduleError as err:
                raise ConfigError(f"[schedule] with [mesh] pp = {mesh.pp}: {err}") from None
        stages = mesh.pp * schedule.chunks
        layers = model.num_layers
        if layers is not None and stages > layers:
            raise ConfigError(
                f"pp x chunks = {mesh.pp} x {schedule.chunks} = {stages} stages but the model "
                f"has {layers} layers: lower [mesh] pp or [schedule] chunks, or add layers"
            )
        positions = model.max_positions
        if positions is not None and batch.seq_len > positions:
            raise ConfigError(
                f"[batch] seq_len = {batch.seq_len} is longer than the model's {positions} "
                "positions: shorten seq_len or raise max_position_embeddings (n_positions)"
            )
        for label, heads in (("attention heads", model.num_heads),
                             ("key/value heads", model.num_kv_heads)):
            if mesh.tp > 1 and heads is not None and heads % mesh.tp:
                raise ConfigError(
                    f"[mesh] tp = {mesh.tp} does not divide the model's {heads} {label}: "
                    f"choose a tp that divides {heads}"
                )

    @property
    def world_size(self) -> int:
        """Processes the run needs (pp x dp x tp)."""
        return self.mesh.world_size

    def train_args(self, model_config: str | None = None) -> list[str]:
        """The ``stagewise train`` flags that run this configuration.

        Flags equal to train's defaults that older trainers lack are left out: ``--model``
        for the tiny GPT, ``--heads`` when it is the default for the width, ``--recompute``
        unless full. ``--chunks`` is given whenever the schedule takes any v. An ``hf:``
        model's ``hf_config`` has no flag (the trainer reads it from the config); pass
        ``model_config`` (a config.json path holding ``hf_config``) to get ``--model-config``.
        """
        mesh, schedule, batch, training, model = (
            self.mesh, self.schedule, self.batch, self.training, self.model)
        args = ["--mesh", mesh.text(), "--schedule", schedule.name]
        if schedule.takes_chunks:
            args += ["--chunks", str(schedule.chunks)]
        args += [
            "--microbatches", str(schedule.microbatches),
            "--batch-size", str(batch.global_batch),
            "--seq-len", str(batch.seq_len),
            "--steps", str(training.steps),
            "--lr", repr(training.lr),
        ]
        if model.spec == "tiny":
            args += ["--dim", str(model.dim), "--layers", str(model.layers)]
            if model.heads != model.default_heads:
                args += ["--heads", str(model.heads)]
        else:
            args += ["--model", model.spec]
        if model_config is not None:
            args += ["--model-config", model_config]
        if model.split:
            args += ["--split", ",".join(model.split)]
        if training.recompute == "full":
            args.append("--recompute")
        return args

    def train_defaults(self) -> dict[str, Any]:
        """The config as ``stagewise train`` argument values, keyed by argparse ``dest``.

        ``parser.set_defaults(**config.train_defaults())`` before parsing makes the file the
        defaults and flags given on the command line override it. ``model_config`` is the
        ``hf_config`` dict itself (the trainer takes a mapping or a path); ``heads`` is None
        when it is train's default for the width, as in :meth:`train_args`.
        """
        mesh, schedule, batch, training, model = (
            self.mesh, self.schedule, self.batch, self.training, self.model)
        values: dict[str, Any] = {
            "mesh": mesh.text(), "schedule": schedule.name,
            "chunks": schedule.chunks if schedule.takes_chunks else None,
            "microbatches": schedule.microbatches, "batch_size": batch.global_batch,
            "seq_len": batch.seq_len, "steps": training.steps, "lr": training.lr,
            "recompute": training.recompute == "full", "model": model.spec,
            "model_config": dict(model.hf_config) if model.hf_config else None,
            "split": ",".join(model.split) if model.split else None,
        }
        if model.spec == "tiny":
            heads = None if model.heads == model.default_heads else model.heads
            values.update(dim=model.dim, layers=model.layers, heads=heads)
        return values

    def to_toml(self) -> str:
        """The configuration as TOML (``tomllib`` reads it back to an equal RunConfig)."""
        schedule_comments = {"chunks": "v, virtual stages per pipeline rank",
                             "microbatches": "m, per replica and step"}
        lines = ["# stagewise run configuration: stagewise train --config FILE"]
        if self.source is not None and self.source.configuration:
            lines.append(f"# planned: {self.source.configuration}")
        _section(lines, "mesh", _values(self.mesh))
        _section(lines, "schedule", _values(self.schedule), schedule_comments)
        _section(lines, "batch", _values(self.batch),
                 {"global_batch": "sequences per step = micro_batch_size x microbatches x dp"})
        _section(lines, "training", _values(self.training))
        model = _values(self.model)
        hf_config = model.pop("hf_config")
        if self.model.spec != "tiny":
            for name in ("layers", "dim", "heads"):
                model.pop(name)
        if not model["split"]:
            model.pop("split")
        _section(lines, "model", model)
        if hf_config:
            _section(lines, "model.hf_config", hf_config)
        if self.source is not None:
            _section(lines, "source", _values(self.source))
        return "\n".join(lines) + "\n"


def _values(section: object) -> dict[str, Any]:
    return {item.name: getattr(section, item.name) for item in fields(section)}  # type: ignore[arg-type]


# Per section: each key and the TOML type it takes.
_SCHEMA: dict[str, dict[str, type]] = {
    "mesh": {"pp": int, "dp": int, "tp": int},
    "schedule": {"name": str, "chunks": int, "microbatches": int},
    "batch": {"global_batch": int, "micro_batch_size": int, "seq_len": int},
    "training": {"steps": int, "lr": float, "recompute": str},
    "model": {"spec": str, "layers": int, "dim": int, "heads": int, "hf_config": dict,
              "split": list},
    "source": {"planner": str, "model": str, "gpu": str, "nodes": int, "gpus_per_node": int,
               "configuration": str, "predicted_step_s": float, "memory_per_gpu_gib": float,
               "notes": list},
}


