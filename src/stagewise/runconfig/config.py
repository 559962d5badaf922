"""The sections of a run configuration as frozen dataclasses, each checked on construction."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from stagewise.errors import ConfigError, ScheduleError
from stagewise.runconfig._toml import _check_toml_values, _check_type, _positive, _section
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
TINY_DEFAULTS = {"layers": 6, "dim": 64}  # stagewise train's --layers and --dim defaults
# Hugging Face config keys that give layers, query heads and key/value heads, per family.
_HF_LAYERS = ("num_hidden_layers", "n_layer")
_HF_HEADS = ("num_attention_heads", "n_head")
_HF_KV_HEADS = ("num_key_value_heads",)
_HF_POSITIONS = ("max_position_embeddings", "n_positions")


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
class ModelConfig:
    """What is trained.

    Attributes:
        spec: ``"tiny"`` (stagewise's tiny GPT), ``"hf:llama"``, ``"hf:gpt2"`` (Hugging Face
            model with random weights) or ``"py:package.module:function"``.
        layers, dim, heads: the tiny GPT's blocks, width and attention heads (``tiny`` only;
            defaults 6, 64 and 4, or 1 head when the width is not a multiple of 4).
        hf_config: Hugging Face config fields for ``hf:`` models (``hidden_size``,
            ``num_hidden_layers``, ...); empty for the runtime's small default.
        split: for ``py:`` models, submodule names in the order they run.
    """

    spec: str = "tiny"
    layers: int | None = None
    dim: int | None = None
    heads: int | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)
    split: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        spec = self.spec
        if not isinstance(spec, str) or not (
            spec == "tiny" or (spec.startswith(("hf:", "py:")) and len(spec) > 3)
        ):
            raise ConfigError(
                f"[model] spec = {spec!r}: write \"tiny\", \"hf:llama\", \"hf:gpt2\" or "
                "\"py:package.module:function\""
            )
        tiny = ("layers", "dim", "heads")
        if spec == "tiny":
            dim = TINY_DEFAULTS["dim"] if self.dim is None else self.dim
            defaults = {"layers": TINY_DEFAULTS["layers"], "dim": dim,
                        "heads": 4 if isinstance(dim, int) and dim % 4 == 0 else 1}
            for name in tiny:
                if getattr(self, name) is None:
                    object.__setattr__(self, name, defaults[name])
                _positive("model", name, getattr(self, name))
            if self.dim % self.heads:  # type: ignore[operator]
                raise ConfigError(
                    f"[model] dim = {self.dim} is not a multiple of heads = {self.heads}: "
                    "choose heads that divide dim"
                )
        else:
            given = [name for name in tiny if getattr(self, name) is not None]
            if given:
                raise ConfigError(
                    f"[model] {', '.join(given)} apply to spec = \"tiny\" only; for {spec!r} "
                    "set the sizes in [model.hf_config] (e.g. num_hidden_layers, hidden_size)"
                )
        if not isinstance(self.hf_config, Mapping):
            raise ConfigError(f"[model.hf_config] must be a table, got {self.hf_config!r}")
        if self.hf_config and not spec.startswith("hf:"):
            raise ConfigError(
                f"[model.hf_config] applies to hf: models only, not {spec!r}: remove it"
            )
        object.__setattr__(self, "hf_config", dict(self.hf_config))
        _check_toml_values("model.hf_config", self.hf_config)
        split = self.split
        if isinstance(split, list):
            split = tuple(split)
            object.__setattr__(self, "split", split)
        if not isinstance(split, tuple) or not all(isinstance(s, str) and s for s in split):
            raise ConfigError(f"[model] split must be a list of names, got {split!r}")
        if split and not spec.startswith("py:"):
            raise ConfigError(f"[model] split applies to py: models only, not {spec!r}")

    def _hf(self, keys: tuple[str, ...]) -> int | None:
        for key in keys:
            value = self.hf_config.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    @property
    def num_layers(self) -> int | None:
        """Transformer blocks, when the config says (None: the runtime decides)."""
        return self.layers if self.spec == "tiny" else self._hf(_HF_LAYERS)

    @property
    def max_positions(self) -> int | None:
        """Longest sequence an ``hf:`` config allows, when it says (None otherwise)."""
        return None if self.spec == "tiny" else self._hf(_HF_POSITIONS)

    @property
    def num_heads(self) -> int | None:
        """Attention (query) heads, when the config says."""
        return self.heads if self.spec == "tiny" else self._hf(_HF_HEADS)

    @property
    def num_kv_heads(self) -> int | None:
        """Key/value heads, when the config says (the query heads without grouped query)."""
        return self._hf(_HF_KV_HEADS) or self.num_heads


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
        for the tiny GPT, ``--recompute`` unless full. ``--chunks`` is given whenever the
        schedule takes any v. The tiny GPT's ``heads`` and an ``hf:`` model's
        ``hf_config`` have no flag (the trainer reads them from the config); pass
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
        ``hf_config`` dict itself (the trainer takes a mapping or a path); ``heads`` is the
        tiny GPT's head count, which has no flag.
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
            values.update(dim=model.dim, layers=model.layers, heads=model.heads)
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


