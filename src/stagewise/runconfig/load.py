"""Reading a run configuration: TOML text or file -> :class:`RunConfig`, with clear errors."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

from stagewise.errors import ConfigError
from stagewise.mesh import Mesh
from stagewise.runconfig._toml import _check_type
from stagewise.runconfig.config import SCHEMA, RunConfig
from stagewise.runconfig.model import ModelConfig
from stagewise.runconfig.sections import (
    BatchConfig,
    CheckpointConfig,
    DataConfig,
    LaunchConfig,
    MetricsConfig,
    ScheduleConfig,
    SourceInfo,
    TrainingConfig,
)

__all__ = ["load_run_config", "parse_run_config"]

# Keys of earlier files that still load, each with a deprecation message: section -> old -> new.
_RENAMED = {"schedule": {"chunks": "num_chunks", "microbatches": "num_microbatches"}}
_SECTIONS = {"schedule": ScheduleConfig, "batch": BatchConfig, "training": TrainingConfig,
             "checkpoint": CheckpointConfig, "launch": LaunchConfig, "data": DataConfig,
             "metrics": MetricsConfig}


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run configuration file (TOML).

    Raises:
        ConfigError: the file is missing or unreadable, is not TOML, has an unknown section
            or key (the message lists the valid ones), a value of the wrong type, or values
            that do not fit together (see :class:`RunConfig`). Messages start with the path.

    Example:
        >>> import tempfile
        >>> from stagewise.runconfig import Mesh, RunConfig, ScheduleConfig
        >>> path = Path(tempfile.mkdtemp()) / "run.toml"
        >>> _ = path.write_text(RunConfig(
        ...     mesh=Mesh(pp=2, dp=2),
        ...     schedule=ScheduleConfig("interleaved-1f1b", num_chunks=2, num_microbatches=4),
        ... ).to_toml())
        >>> config = load_run_config(path)
        >>> config.mesh.pp, config.schedule.name, config.schedule.num_chunks
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
    unknown = sorted(set(document) - set(SCHEMA))
    if unknown:
        raise ConfigError(
            f"unknown section [{unknown[0]}]: the sections are "
            f"{', '.join('[' + s + ']' for s in SCHEMA)}"
        )
    sections = {name: _section_values(name, document.get(name, {})) for name in SCHEMA}
    model = sections["model"]
    if "split" in model:
        model["split"] = tuple(model["split"])
    built: dict[str, Any] = {name: kind(**sections[name]) for name, kind in _SECTIONS.items()}
    return RunConfig(
        mesh=Mesh(**{**RunConfig.mesh.to_dict(), **sections["mesh"]}),
        model=ModelConfig(**model),
        source=SourceInfo(**sections["source"]) if "source" in document else None,
        **built,
    )


def _section_values(name: str, values: object) -> dict[str, Any]:
    """One section's keys, checked against the schema (old key names renamed, with a note)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{name} must be a [{name}] section, got {values!r}")
    values = dict(values)
    for old, new in _RENAMED.get(name, {}).items():
        if old in values:
            print(f"stagewise: warning: [{name}] {old} is deprecated; write {new}",
                  file=sys.stderr)
            if new in values:
                raise ConfigError(f"[{name}] gives both {old} and {new}: keep {new}")
            values[new] = values.pop(old)
    schema = SCHEMA[name]
    extra = sorted(set(values) - set(schema))
    if extra:
        raise ConfigError(
            f"unknown key {extra[0]!r} in [{name}]: the keys are {', '.join(schema)}"
        )
    for key, value in values.items():
        _check_type(name, key, value, schema[key])
    return values
