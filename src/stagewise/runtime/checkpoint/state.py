"""Checkpoints with ``torch.distributed.checkpoint`` (DCP), keyed by model layer.

A checkpoint names every tensor by the index of the model layer that holds it, never by
stage, rank or replica: parameter ``w`` of layer 3 is ``model.3.w`` and its AdamW moments are
``optim.state.3.w.exp_avg`` and so on (the optimizer state flattened per parameter, as DCP
needs when ranks hold different parameters). So a checkpoint written under one layout (any
``pp``, chunks per rank, partition or ``dp``) loads under any other that cuts the same
layers: each rank reads the layers it now holds. Parameters replicated over data-parallel
replicas are written once (DCP removes duplicate keys) and read by every replica; ``DTensor``
parameters (tensor parallelism) are saved and resharded by DCP.

On disk, ``folder/step-00000012/`` holds DCP's files, ``extra.pt`` (the step and the caller's
small extras, written by one rank) and a completion marker; a save cut short by a crash leaves
only a ``.partial`` folder, which :func:`latest_checkpoint` never takes (see
``checkpoint_folders``).

For a resumed run to repeat the uninterrupted one exactly, step ``s``'s data must be a function
of the seed and ``s`` alone (e.g. ``torch.Generator().manual_seed(seed * 1_000_003 + s)``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from stagewise.errors import ConfigError, RuntimeFailure
from stagewise.runtime.checkpoint.folders import (
    EXTRA,
    MARKER,
    checkpoint_name,
    complete_checkpoints,
    latest_checkpoint,
    mark_complete,
    prune,
)

__all__ = ["latest_checkpoint", "load_checkpoint", "rank_layers", "save_checkpoint"]

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def rank_layers(stages: Mapping[int, nn.Module], sizes: Sequence[int]) -> dict[int, nn.Module]:
    """This rank's layers by model layer index, from its ``{stage: module}`` and the cut.

    Args:
        stages: the stages this rank holds (``stages_for_rank``), each a sequence of layers
            (``nn.Sequential`` from ``partition``, or its recomputed form).
        sizes: layers per stage over the whole model (``[len(s) for s in partition(...)]``).

    Raises:
        ConfigError: a stage index outside ``sizes`` or a stage whose length differs.

    Example:
        >>> stages = {1: nn.Sequential(nn.Linear(2, 2))}
        >>> list(rank_layers(stages, [2, 1]))
        [2]
    """
    layers: dict[int, nn.Module] = {}
    for stage, module in sorted(stages.items()):
        if not 0 <= stage < len(sizes):
            raise ConfigError(
                f"stage {stage} is outside the cut of {len(sizes)} stages {list(sizes)}: "
                "pass the sizes of the partition these stages came from"
            )
        children = list(module.children())
        if len(children) != sizes[stage]:
            raise ConfigError(
                f"stage {stage} has {len(children)} layers but the cut {list(sizes)} gives it "
                f"{sizes[stage]}: pass the sizes of the partition these stages came from"
            )
        first = sum(sizes[:stage])
        for position, layer in enumerate(children):
            layers[first + position] = layer
    return layers


def save_checkpoint(
    folder: str | os.PathLike[str],
    step: int,
    layers: Mapping[int, nn.Module],
    optimizer: torch.optim.Optimizer,
    extra: Mapping[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write a checkpoint of step ``step``; a collective over every rank of the default group
    (without a process group, this process saves alone).

    An optimizer without state yet (no step taken) saves none, and gets none back at the load.

    Args:
        folder: where checkpoints live (created if missing); the same path on every rank.
        step: optimizer steps done (the folder's name; resume runs step ``step`` next).
        layers: this rank's layers by model layer index (:func:`rank_layers`).
        optimizer: this rank's optimizer, over exactly these layers' parameters.
        extra: small values saved beside (losses so far...): tensors, numbers, strings,
            and lists, tuples and dicts of them. Pass it on the ranks that have it (e.g. the
            last stage's, which has the losses) and None elsewhere: the lowest rank passing
            one writes it.
        keep: keep only the newest ``keep`` complete checkpoints (None keeps all).

    Returns:
        The complete checkpoint's folder, ``folder/step-<step, 8 digits>``.

    Raises:
        ConfigError: ``step`` or ``keep`` below 0 or 1, or ``folder`` already holds a complete
            checkpoint of a later step (another run's: a resume would take it).
    """
    if step < 0:
        raise ConfigError(f"checkpoint step must be >= 0, got {step}")
    if keep is not None and keep < 1:
        raise ConfigError(f"keep must be >= 1 checkpoints (or None for all), got {keep}")
    root = Path(folder)
    final = root / checkpoint_name(step)
    partial = final.with_name(final.name + ".partial")
    # Every rank looks (the same folder, before any collective), so all raise together.
    later = [path for number, path in complete_checkpoints(root) if number > step]
    if later:
        raise ConfigError(
            f"cannot save step {step} in {str(root)!r}: it already holds {later[-1].name}, a "
            "later step (another run's, which a resume would take): use an empty "
            "--checkpoint-dir, or resume from the newest checkpoint"
        )
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that crashed
        partial.mkdir()
    _barrier()
    # No state yet (no step taken): save none rather than let DCP make some by a zero-lr
    # step, which AdamW would count.
    try:
        _write_state(_state(layers, optimizer if optimizer.state else None), partial)
        if rank == _extra_writer(extra is not None):
            torch.save({"step": step, "extra": dict(extra or {})}, partial / EXTRA)
    except (Exception, CheckpointException) as err:  # out of space, read-only: on every rank
        reason = _disk_reason(err)
        if reason is None:
            raise  # not the disk (a peer that failed): the partial folder shows how far it got
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeFailure(
            f"rank {rank} could not write checkpoint step {step} in {str(root)!r}: {reason}; "
            "the partial folder was removed: free space or pick another --checkpoint-dir, "
            "then --resume from the last complete checkpoint") from None
    _barrier()  # every rank's files are written
    if rank == 0:
        mark_complete(partial, final, step, _world_size())
        if keep is not None:
            prune(root, keep)
    _barrier()  # no rank goes on (or saves again) before the checkpoint is complete
    return final


def load_checkpoint(
    path: str | os.PathLike[str],
    layers: Mapping[int, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load a complete checkpoint into this rank's layers and optimizer; a collective.

    Every rank reads the layers it holds now, whatever layout wrote them.

    Args:
        path: a complete checkpoint (:func:`latest_checkpoint`).
        layers: this rank's layers by model layer index (:func:`rank_layers`).
        optimizer: this rank's optimizer over these layers' parameters, or None to load the
            parameters alone.

    Returns:
        ``{"step": steps done, "extra": the extra saved}``; the same on every rank.

    Raises:
        ConfigError: ``path`` is not a complete checkpoint, the checkpoint's layers do not
            match the model (a name or shape missing, different, or left over), or it lacks
            optimizer state ``optimizer`` has (saved with another optimizer).
    """
    where = Path(path)
    if not (where / MARKER).is_file():
        raise ConfigError(
            f"{str(where)!r} is not a complete checkpoint (no {MARKER} marker): pass a folder "
            "that latest_checkpoint() returns"
        )
    model = _as_module(layers)
    state = _state(layers, optimizer)
    params = _optimizer_params(model, optimizer, state.get("optim", {}))
    stateless = _check(where, layers, params)
    # Partial: a hyperparameter the checkpoint lacks (an optimizer option added since) keeps
    # its current value; every tensor was checked to be there.
    planner = dcp.DefaultLoadPlanner(allow_partial_load=True)
    with _single_process_quiet(), _unreadable(where):
        dcp.load(state, checkpoint_id=where, planner=planner, no_dist=not _distributed())
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=_OPTIONS)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=_OPTIONS)
        for name in stateless:  # none at the save (no step yet): none now either
            optimizer.state.pop(params[name][0], None)
    with _unreadable(where):
        saved = torch.load(where / EXTRA, weights_only=True)
    return {"step": int(saved["step"]), "extra": saved["extra"]}


@contextlib.contextmanager
def _unreadable(path: Path) -> Iterator[None]:
    """A failed read of a checkpoint's files as one line naming the folder (DCP's own report
    is a flattened traceback of every rank)."""
    try:
        yield
    except ConfigError:
        raise
    except (Exception, CheckpointException) as err:
        raise ConfigError(
            f"checkpoint {str(path)!r} could not be read ({_reason(err)}): a file is damaged "
            "or missing; `stagewise train --resume` checks each file against the manifest and "
            "names it") from None


def _disk_reason(err: BaseException) -> str | None:
    """The file system's complaint in a failed write, in a few words (DCP wraps it in a long
    report of every rank), or None when the failure is not the disk's."""
    text = str(err)
    for known in ("No space left on device", "File too large", "Disk quota exceeded",
                  "Read-only file system", "Permission denied"):
        if known in text:
            return known
    return None


def _reason(err: BaseException) -> str:
    """The cause of a failed read or write in a few words."""
    return _disk_reason(err) or f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"


def _distributed() -> bool:
    """Whether a default process group exists (without one, this process is the only rank)."""
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _extra_writer(has_extra: bool) -> int:
    """The lowest rank with an extra to save, or 0 when none has; a collective."""
    if not _distributed():
        return 0
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, has_extra)
    return next((rank for rank, has in enumerate(everyone) if has), 0)


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's warning that it runs in one process (intended here without a group)."""
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _as_module(layers: Mapping[int, nn.Module]) -> nn.ModuleDict:
    """The layers as one module whose parameter names are ``"<layer index>.<name>"``."""
    return nn.ModuleDict({str(index): layer for index, layer in sorted(layers.items())})


def _state(
    layers: Mapping[int, nn.Module], optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` keyed by layer index, as DCP saves and loads it (an
    optimizer without state gets some: a zero-lr step on zero gradients)."""
    model = _as_module(layers)
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=_OPTIONS)}
    model_state, optim_state = get_state_dict(model, optimizer, options=_OPTIONS)
    return {"model": model_state, "optim": optim_state}


def _write_state(state: dict[str, Any], folder: Path) -> None:
    """Every rank's share of ``state`` into ``folder`` (DCP; replicated keys written once)."""
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=folder, no_dist=not _distributed())


def _optimizer_params(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, flat: Mapping[str, Any]
) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """``{name: (parameter, its state's names)}`` for every parameter with optimizer state,
    named as the flattened optimizer state ``flat`` names it (``"state.<name>.<state>"``)."""
    if optimizer is None:
        return {}
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    found: dict[str, tuple[torch.Tensor, list[str]]] = {}
    for owner, values in optimizer.state.items():  # keyed by parameter
        keys = list(values)
        for name in names.get(id(owner), []):
            if keys and f"state.{name}.{keys[0]}" in flat:
                found[name] = (owner, keys)
                break
    return found


def _check(
    path: Path,
    layers: Mapping[int, nn.Module],
    optim_params: Mapping[str, tuple[torch.Tensor, list[str]]],
) -> list[str]:
    """Raise ConfigError (on every rank alike) at the first tensor of the model that the
    checkpoint lacks or holds with another shape, a tensor of the checkpoint no rank holds,
    or optimizer state of ``optim_params`` other than the checkpoint's for a parameter.

    Returns:
        The parameters of ``optim_params`` without state in the checkpoint.
    """
    with _unreadable(path):
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    mine: list[str] = []
    problem = None
    for index, layer in sorted(layers.items()):
        for name, tensor in layer.state_dict().items():
            key = f"model.{index}.{name}"
            mine.append(key)
            entry = saved.get(key)
            shape = tuple(getattr(entry, "size", ()))
            if problem is not None:
                continue
            if entry is None:
                problem = (
                    f"checkpoint {str(path)!r} has no {index}.{name} (layer {index}, "
                    f"{type(layer).__name__}): it was written for another model; load it into "
                    "the model it was saved from (same layers and sizes) or start from scratch"
                )
            elif shape != tuple(tensor.shape):
                problem = (
                    f"checkpoint {str(path)!r}: {index}.{name} has shape {list(shape)} there but "
                    f"{list(tensor.shape)} in this model: load it into the model it was saved "
                    "from (same sizes) or start from scratch"
                )
    with_state = _state_owners(saved)
    stateless = [name for name in optim_params if name not in with_state]
    missing = [
        f"{name}.{key}" for name, (_, keys) in optim_params.items() if name in with_state
        for key in keys if f"optim.state.{name}.{key}" not in saved
    ]
    if problem is None and missing:
        problem = (
            f"checkpoint {str(path)!r} has no optimizer state {missing[0]}: it was saved with "
            "another optimizer; resume with the optimizer it was saved with, or load the "
            "parameters alone (optimizer=None)"
        )
    # Every rank learns every rank's verdict, so all raise together (none waits in the load).
    everyone: list[Any] = [(problem, mine)]
    if _distributed():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (problem, mine))
    problems = [found for found, _ in everyone if found is not None]
    if problems:
        raise ConfigError(problems[0])
    held = {key for _, keys in everyone for key in keys}
    left = sorted(k for k in saved if k.startswith("model.") and k not in held)
    if left:
        raise ConfigError(
            f"checkpoint {str(path)!r} holds {left[0][len('model.'):]}, which no rank's layers "
            f"have ({len(left)} such tensors): it was written for a bigger or different model; "
            "load it into the model it was saved from"
        )
    return stateless


def _state_owners(saved: Mapping[str, Any]) -> set[str]:
    """Every name that some ``optim.state.<name>.<state>`` key of ``saved`` could have (all
    dotted prefixes: the split between parameter and state name is not marked)."""
    owners: set[str] = set()
    for key in saved:
        if key.startswith("optim.state."):
            parts = key[len("optim.state."):].split(".")
            owners.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return owners
