"""Reading a run configuration: TOML text or file -> :class:`RunConfig`, with clear errors."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import tomllib

from stagewise.errors import ConfigError, ScheduleError
from stagewise.runconfig._toml import _check_type
from stagewise.runconfig.config import (
    _SCHEMA,
    BatchConfig,
    MeshConfig,
    ModelConfig,
    RunConfig,
    ScheduleConfig,
    SourceInfo,
    TrainingConfig,
)
from stagewise.schedules import get

__all__ = ["load_run_config", "parse_run_config"]


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run configuration file (TOML).

    Raises:
        ConfigError: the file is missing or unreadable, is not TOML, has an unknown section
            or key (the message lists the valid ones), a value of the wrong type, or values
            that do not fit together (see :class:`RunConfig`). Messages start with the path.

    Example:
        >>> import tempfile
        >>> from stagewise.runconfig import MeshConfig, RunConfig, ScheduleConfig
        >>> path = Path(tempfile.mkdtemp()) / "run.toml"
        >>> _ = path.write_text(RunConfig(
        ...     mesh=MeshConfig(pp=2, dp=2),
        ...     schedule=ScheduleConfig("interleaved-1f1b", chunks=2, microbatches=4),
        ... ).to_toml())
        >>> config = load_run_config(path)
        >>> config.mesh.pp, config.schedule.name, config.schedule.chunks
        (2, 'interleaved-1f1b', 2)
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"run configuration {str(path)!r} does not exist: write one with "
            f"stagewise plan ... --emit-config {path}"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read run configuration {str(path)!r}: {err}") from None
    try:
        return parse_run_config(text)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def parse_run_config(text: str) -> RunConfig:
    """The :class:`RunConfig` a TOML text describes (errors as in :func:`load_run_config`)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"not valid TOML: {err}") from None
    unknown = sorted(set(document) - set(_SCHEMA))
    if unknown:
        raise ConfigError(
            f"unknown section [{unknown[0]}]: the sections are "
            f"{', '.join('[' + s + ']' for s in _SCHEMA)}"
        )
    sections: dict[str, dict[str, Any]] = {}
    for name, schema in _SCHEMA.items():
        values = document.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{name} must be a [{name}] section, got {values!r}")
        extra = sorted(set(values) - set(schema))
        if extra:
            raise ConfigError(
                f"unknown key {extra[0]!r} in [{name}]: the keys are {', '.join(schema)}"
            )
        for key, value in values.items():
            _check_type(name, key, value, schema[key])
        sections[name] = dict(values)
    schedule = sections["schedule"]
    schedule.setdefault("name", ScheduleConfig.name)
    if "chunks" not in schedule and isinstance(schedule["name"], str):
        with contextlib.suppress(ScheduleError):  # ScheduleConfig names the valid schedules
            schedule["chunks"] = get(schedule["name"]).default_chunks
    mesh = MeshConfig(**sections["mesh"])
    built = ScheduleConfig(**schedule)
    batch = sections["batch"]
    if "micro_batch_size" not in batch:
        batch["micro_batch_size"] = _micro_batch_size(batch, built, mesh)
    model = sections["model"]
    if "split" in model:
        model["split"] = tuple(model["split"])
    return RunConfig(
        mesh=mesh, schedule=built, batch=BatchConfig(**batch),
        training=TrainingConfig(**sections["training"]), model=ModelConfig(**model),
        source=SourceInfo(**sections["source"]) if "source" in document else None,
    )


def _micro_batch_size(batch: dict[str, Any], schedule: ScheduleConfig, mesh: MeshConfig) -> int:
    """micro_batch_size = global_batch / (microbatches x dp), when whole."""
    global_batch = batch.get("global_batch", BatchConfig.global_batch)
    split = schedule.microbatches * mesh.dp
    if global_batch % split:
        raise ConfigError(
            f"[batch] global_batch = {global_batch} is not divisible by microbatches x dp = "
            f"{schedule.microbatches} x {mesh.dp} = {split}: choose a multiple of {split}"
        )
    return max(1, global_batch // split)
