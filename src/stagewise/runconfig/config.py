"""One training run, complete: :class:`RunConfig`, the one type behind the TOML file, ``--config``
and ``stagewise train``'s flags (flags are overrides applied to it: :meth:`RunConfig.override`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from stagewise.errors import ConfigError
from stagewise.mesh import Mesh
from stagewise.runconfig._toml import _section
from stagewise.runconfig.model import ModelConfig
from stagewise.runconfig.sections import (
    SOURCE_KEYS,
    UNBUILT,
    BatchConfig,
    CheckpointConfig,
    DataConfig,
    LaunchConfig,
    MetricsConfig,
    ScheduleConfig,
    SourceInfo,
    TrainingConfig,
)

__all__ = ["SCHEMA", "RunConfig"]

DEFAULT_MESH = Mesh(pp=4)  # stagewise train's default: one pipeline of 4 ranks


@dataclass(frozen=True)
class RunConfig:
    """One training run, complete: ``stagewise train --config`` needs nothing else.

    Checked on construction: every section's values, then the sections together (the batch
    splits over the replicas and into micro-batches, the schedule builds for pp ranks and m
    micro-batches, the stages fit the layers, TP divides the heads, the sequence fits the
    positions).

    Example:
        >>> config = RunConfig(mesh=Mesh(pp=2, dp=2),
        ...                    batch=BatchConfig(global_batch=32, micro_batch_size=2))
        >>> config.train_args()[:4]
        ['--mesh', 'pp=2,dp=2', '--schedule', '1f1b']
        >>> config.override({"training": {"steps": 5}}).training.steps
        5
    """

    mesh: Mesh = DEFAULT_MESH
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: SourceInfo | None = None

    def __post_init__(self) -> None:
        self._check_batch()
        if self.schedule.name not in UNBUILT:
            self.schedule.build(self.mesh.pp)
        self._check_model()
        self._check_data()

    def _check_data(self) -> None:
        model, data = self.model, self.data
        if data.any and data.tokenizer is None and not model.is_folder:
            raise ConfigError(
                f"--data needs a tokenizer: train a Hugging Face model folder (--model DIR; "
                f"its tokenizer is used), or pass --tokenizer DIR for {model.spec!r}"
            )
        if self.training.lora is not None and not model.is_folder:
            raise ConfigError(f"--lora adapts a Hugging Face model folder: train --model DIR, "
                              f"not {model.spec!r}")
        if self.training.lora is not None and self.mesh.tp > 1:
            raise ConfigError(f"--lora with tp={self.mesh.tp} is not supported (adapters are "
                              "not sharded): use tp=1 (pp and dp work with LoRA)")
        if self.checkpoint.export_hf is not None and not model.is_folder:
            raise ConfigError(
                f"--export-hf writes a Hugging Face folder of a model read from one: train "
                f"--model DIR, not {model.spec!r}"
            )

    def _check_batch(self) -> None:
        mesh, batch, m = self.mesh, self.batch, self.schedule.num_microbatches
        if batch.micro_batch_size is not None:
            per_step = batch.micro_batch_size * m * mesh.dp
            if batch.global_batch != per_step:
                raise ConfigError(
                    f"[batch] global_batch = {batch.global_batch} is not micro_batch_size x "
                    f"num_microbatches x dp = {batch.micro_batch_size} x {m} x {mesh.dp} = "
                    f"{per_step}: set global_batch = {per_step} or change the others"
                )
        if batch.global_batch % mesh.dp:
            raise ConfigError(
                f"global batch {batch.global_batch} does not split evenly over dp={mesh.dp} "
                f"replicas: use a multiple of {mesh.dp} (--global-batch)"
            )
        if batch.global_batch // mesh.dp < m:
            replicas = f"each of the dp={mesh.dp} replicas gets" if mesh.dp > 1 else "the step has"
            raise ConfigError(
                f"{replicas} {batch.global_batch // mesh.dp} sequences, fewer than the {m} "
                "micro-batches: raise --global-batch or lower --microbatches"
            )

    def _check_model(self) -> None:
        mesh, model = self.mesh, self.model
        stages = mesh.pp * (self.schedule.num_chunks or 1)
        blocks = model.num_layers
        # The pipeline cuts between layers: the blocks plus the embedding and the head.
        if blocks is not None and stages > blocks + 2:
            raise ConfigError(
                f"pp x num_chunks = {mesh.pp} x {self.schedule.num_chunks} = {stages} stages "
                f"but the model has {blocks + 2} layers ({blocks} block{'s' * (blocks != 1)}, "
                "the embedding and the head): lower [mesh] pp or [schedule] num_chunks, or add "
                "layers"
            )
        positions = model.max_positions
        if positions is not None and self.batch.seq_len > positions:
            raise ConfigError(
                f"[batch] seq_len = {self.batch.seq_len} is longer than the model's {positions} "
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

    def override(self, changes: Mapping[str, Mapping[str, Any]]) -> RunConfig:
        """This configuration with some values replaced, checked again as a whole.

        ``changes`` maps a section (``"training"``) to the values it changes (``{"steps":
        5}``); ``"mesh"`` takes a :class:`Mesh`'s fields. Changes that make other values
        meaningless drop them: another schedule ``name`` without ``num_chunks`` takes that
        schedule's default v; a schedule ``file`` replaces the schedule (and its sizes);
        another model ``spec`` starts from that model's defaults (no inherited shape).

        Raises:
            ConfigError: an unknown section or key, or values that do not fit together.
        """
        sections = {item.name: getattr(self, item.name) for item in fields(self)}
        for name, values in changes.items():
            if name not in sections or name == "source":
                raise ConfigError(f"cannot override [{name}]: the sections are "
                                  f"{', '.join(s for s in sections if s != 'source')}")
            sections[name] = _override(name, sections[name], dict(values))
        return RunConfig(**sections)

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
            args += ["--chunks", str(schedule.num_chunks)]
        args += ["--microbatches", str(schedule.num_microbatches),
                 "--global-batch", str(batch.global_batch), "--seq-len", str(batch.seq_len),
                 "--steps", str(training.steps), "--lr", repr(training.lr)]
        if model.spec == "tiny":
            args += ["--dim", str(model.dim), "--layers", str(model.layers)]
            if model.heads != model.default_heads:
                args += ["--heads", str(model.heads)]
        else:
            args += ["--model", model.spec]
        if model_config is not None or model.config_file is not None:
            args += ["--model-config", str(model_config or model.config_file)]
        if model.split:
            args += ["--split", ",".join(model.split)]
        if training.recompute == "full":
            args.append("--recompute")
        return args

    def to_toml(self) -> str:
        """The configuration as TOML (``tomllib`` reads it back to an equal RunConfig).

        Values that are None and the ``[checkpoint]``, ``[launch]`` and ``[data]`` sections
        left at their defaults are left out.
        """
        lines = ["# stagewise run configuration: stagewise train --config FILE"]
        if self.source is not None and self.source.configuration:
            lines.append(f"# planned: {self.source.configuration}")
        _section(lines, "mesh", self.mesh.to_dict())
        _section(lines, "schedule", _values(self.schedule),
                 {"num_chunks": "v, chunks (virtual stages) per pipeline rank",
                  "num_microbatches": "m, per replica and step"})
        _section(lines, "batch", _values(self.batch),
                 {"global_batch": "sequences per step = micro_batch_size x num_microbatches x dp"})
        _section(lines, "training", _values(self.training))
        _model_section(lines, self.model)
        for name in ("checkpoint", "launch", "data", "metrics"):
            section = getattr(self, name)
            if section != type(section)():
                _section(lines, name, _values(section))
        if self.source is not None:
            _section(lines, "source", _values(self.source))
        return "\n".join(lines) + "\n"


def _override(name: str, section: Any, values: dict[str, Any]) -> Any:
    """``section`` with ``values`` replaced (see :meth:`RunConfig.override`)."""
    known = SCHEMA[name]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in [{name}]: the keys are "
                          f"{', '.join(known)}")
    if name == "schedule":
        if "file" in values:
            return ScheduleConfig(file=values["file"]) if values["file"] else ScheduleConfig(
                **{k: v for k, v in values.items() if k != "file"})
        if values.get("name", section.name) != section.name and "num_chunks" not in values:
            values["num_chunks"] = None  # the old v belongs to the old schedule
        values.setdefault("file", None)
    if name == "model" and values.get("spec", section.spec) != section.spec:
        return ModelConfig(**values)
    return replace(section, **values)


def _values(section: object) -> dict[str, Any]:
    """A section's fields for TOML, without None values and private fields."""
    return {
        item.name: getattr(section, item.name)
        for item in fields(section)  # type: ignore[arg-type]
        if not item.name.startswith("_") and getattr(section, item.name) is not None
    }


def _model_section(lines: list[str], model: ModelConfig) -> None:
    values = _values(model)
    hf_config = values.pop("hf_config")
    if model.spec != "tiny":
        for name in ("layers", "dim", "heads"):
            values.pop(name, None)
    if not values["split"]:
        values.pop("split")
    _section(lines, "model", values)
    if hf_config:
        _section(lines, "model.hf_config", hf_config)


# Per section: each key and the TOML type it takes.
SCHEMA: dict[str, dict[str, type]] = {
    "mesh": {"pp": int, "dp": int, "tp": int, "dp_shard": bool},
    "schedule": {"name": str, "num_chunks": int, "num_microbatches": int, "file": str},
    "batch": {"global_batch": int, "micro_batch_size": int, "seq_len": int},
    "training": {"steps": int, "lr": float, "recompute": str, "seed": int, "partition": str,
                 "check_finite": bool, "dtype": str, "weight_decay": float, "clip_grad": float,
                 "lr_schedule": str, "warmup_steps": int, "grad_accum": int, "lora": str},
    "model": {"spec": str, "layers": int, "dim": int, "heads": int, "hf_config": dict,
              "split": list, "config_file": str},
    "checkpoint": {"dir": str, "save_every": int, "keep": int, "resume": bool, "resume_from": int,
                   "export_hf": str},
    "metrics": {"tensorboard": str, "jsonl": str},
    "data": {"paths": list, "eval_paths": list, "eval_every": int, "tokenizer": str,
             "cache_dir": str},
    "launch": {"device": str, "timeout": float, "threads": int},
    "source": SOURCE_KEYS,
}
