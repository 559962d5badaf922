"""``stagewise train``'s flags as overrides of one :class:`RunConfig`: no argv re-parsing.

The parser gives every option the default None, so a value that is not None was given on the
command line. :func:`run_config` starts from the ``--config`` file (or train's defaults) and
applies the given flags with :meth:`RunConfig.override`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from stagewise.errors import ConfigError
from stagewise.mesh import Mesh
from stagewise.runconfig import RunConfig, load_run_config

__all__ = ["run_config"]

# section -> {argparse dest: key in the section}, for flags that map one to one.
_PLAIN = {
    "schedule": {"schedule": "name", "chunks": "num_chunks", "microbatches": "num_microbatches"},
    "batch": {"global_batch": "global_batch", "seq_len": "seq_len"},
    "training": {"steps": "steps", "lr": "lr", "seed": "seed", "partition": "partition",
                 "check_finite": "check_finite", "dtype": "dtype",
                 "weight_decay": "weight_decay", "clip_grad": "clip_grad",
                 "lr_schedule": "lr_schedule", "warmup_steps": "warmup_steps",
                 "grad_accum": "grad_accum", "lora": "lora"},
    "metrics": {"tensorboard": "tensorboard", "metrics": "jsonl"},
    "model": {"model": "spec", "model_config": "config_file", "dim": "dim", "layers": "layers",
              "heads": "heads"},
    "checkpoint": {"checkpoint_dir": "dir", "save_every": "save_every", "keep": "keep",
                   "resume": "resume", "export_hf": "export_hf", "resume_from": "resume_from"},
    "data": {"data": "paths", "eval_data": "eval_paths", "eval_every": "eval_every",
             "tokenizer": "tokenizer", "data_cache": "cache_dir"},
    "launch": {"device": "device", "timeout": "timeout", "threads": "threads"},
}


def run_config(args: argparse.Namespace, torchrun: bool) -> RunConfig:
    """The run the command line describes: the ``--config`` file (or the defaults) with every
    flag given applied on top.

    Raises:
        ConfigError: flags that contradict each other or the file, or values that do not fit
            together (see :class:`RunConfig`).
    """
    base = load_run_config(args.config) if args.config is not None else None
    config = base or RunConfig()
    changes = _changes(args)
    _sizes_from(changes, args, config, base, torchrun)
    resized = "global_batch" in changes.get("batch", {}) or "schedule" in changes
    if resized or changes.get("mesh", {}).get("dp", config.mesh.dp) != config.mesh.dp:
        # The file's micro-batch size belongs to its batch, m and dp: split what is given.
        changes.setdefault("batch", {})["micro_batch_size"] = None
    world = int(os.environ["WORLD_SIZE"]) if torchrun else None
    result = config.override(changes)
    if torchrun and result.checkpoint.export_hf and not result.checkpoint.dir:
        raise ConfigError("--export-hf under torchrun needs --checkpoint-dir on storage every "
                          "node shares (the export reads every rank's shard)")
    if world is not None and result.world_size != world:
        raise ConfigError(
            f"mesh {result.mesh.text()} needs {result.world_size} ranks but torchrun started "
            f"{world}: start {result.world_size} processes or change the mesh"
        )
    return result


def _changes(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The sections and values the flags given on the command line change."""
    changes: dict[str, dict[str, Any]] = {}
    for section, flags in _PLAIN.items():
        for dest, key in flags.items():
            value = getattr(args, dest, None)
            if value is not None:
                changes.setdefault(section, {})[key] = value
    if args.recompute is not None:
        changes.setdefault("training", {})["recompute"] = "full" if args.recompute else "none"
    if args.split is not None:
        changes.setdefault("model", {})["split"] = tuple(
            n.strip() for n in args.split.split(",") if n.strip())
    if args.schedule_file is not None:
        changes["schedule"] = {"file": args.schedule_file}
    model = changes.get("model", {})
    if "dim" in model and "heads" not in model:
        model["heads"] = 4 if model["dim"] % 4 == 0 else 1  # train's rule for the width
    return changes


def _sizes_from(changes: dict[str, dict[str, Any]], args: argparse.Namespace,
                config: RunConfig, base: RunConfig | None, torchrun: bool) -> None:
    """The mesh from ``--mesh`` and ``-p`` (checked against each other, the file, the schedule
    file and torchrun's world), and the schedule file's sizes against ``-m``."""
    world = int(os.environ["WORLD_SIZE"]) if torchrun else None
    mesh = Mesh.parse(args.mesh, world) if args.mesh is not None else None
    file_ranks = _schedule_file_sizes(args)
    if mesh is not None and args.ranks is not None and args.ranks != mesh.pp:
        raise ConfigError(
            f"-p {args.ranks} disagrees with --mesh {args.mesh} (pp={mesh.pp}): drop -p, or "
            f"give --mesh with pp={args.ranks}; the mesh's pp is the pipeline's ranks"
        )
    if mesh is None and base is not None and args.ranks is not None and (
            args.ranks != base.mesh.pp):
        raise ConfigError(
            f"-p {args.ranks} disagrees with the mesh {base.mesh.text()} of {args.config} "
            f"(pp={base.mesh.pp}): drop -p, or give --mesh with pp={args.ranks}"
        )
    pp = mesh.pp if mesh is not None else (args.ranks if args.ranks is not None else file_ranks)
    if mesh is None and pp is None and base is None:
        pp = world if world is not None else config.mesh.pp
    if mesh is None and pp is not None:
        mesh = Mesh(pp=pp) if base is None else Mesh(pp, base.mesh.dp, base.mesh.tp,
                                                     base.mesh.dp_shard)
    if mesh is not None:
        changes["mesh"] = dict(_fields(mesh))


def _schedule_file_sizes(args: argparse.Namespace) -> int | None:
    """The schedule file's ranks (None without a file), after checking ``-m`` against it."""
    if args.schedule_file is None:
        return None
    from stagewise.runconfig import ScheduleConfig

    loaded = ScheduleConfig(file=args.schedule_file)
    if args.microbatches is not None and args.microbatches != loaded.num_microbatches:
        raise ConfigError(
            f"-m {args.microbatches} disagrees with {args.schedule_file}, which has "
            f"{loaded.num_microbatches}: drop -m or fix the file"
        )
    return loaded.file_ranks


def _fields(mesh: Mesh) -> Mapping[str, Any]:
    return {"pp": mesh.pp, "dp": mesh.dp, "tp": mesh.tp, "dp_shard": mesh.dp_shard}
