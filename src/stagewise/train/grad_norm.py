"""Gradient clipping by the global norm: the L2 norm of every gradient of the whole model, over
every pipeline, tensor-parallel and data-parallel rank.

The norm equals ``torch.nn.utils.clip_grad_norm_`` on one process holding the whole model, so
each element of the model's gradient must be counted exactly once in the world:

- pp: each rank counts its own stages; one all-reduce (a sum of squares) over the world adds
  the pipeline ranks up;
- tied copies (the embedding on the first stage, the head on the last): after the pipeline's
  tie exchange both hold the whole summed gradient, so only the copy on the tie's lowest stage
  counts;
- tp: a ``DTensor`` gradient sharded (``Shard``) over the tp ranks counts its local shard on
  every tp rank; a replicated one (plain tensor, or ``Replicate``) counts on tp rank 0 only;
  a ``Partial`` one is reduced first;
- dp: plain replicas hold the same averaged gradient, so it counts on dp rank 0 only; under
  FSDP2 each replica holds a ``Shard`` of a ``DTensor`` over the dp axis, which every replica
  counts.

A gradient's mesh dimensions are told apart by their ranks (the tp group's or the dp group's),
so FSDP2's 2-D ``(dp, tp)`` gradients are covered too. Call it after the pipeline's step (tied
copies summed) and the data-parallel reduction, before ``optimizer.step``; every rank of the
world must call it (one collective).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from stagewise.errors import ConfigError
from stagewise.runtime.parallel.mesh import MeshGroups
from stagewise.train.optim import scale_grads, unique_parameters

__all__ = ["clip_grad_norm", "counted_parameters", "global_grad_norm"]

EPSILON = 1e-6  # added to the norm before dividing, as torch's clip_grad_norm_


@dataclass(frozen=True)
class _Axes:
    """This rank's coordinates on the replica axes, and the global ranks along each."""

    dp_rank: int
    tp_rank: int
    dp_ranks: tuple[int, ...]
    tp_ranks: tuple[int, ...]


def global_grad_norm(
    stages: Mapping[int, nn.Module],
    groups: MeshGroups | None = None,
    *,
    ties: Sequence[Mapping[int, str]] = (),
    group: dist.ProcessGroup | None = None,
) -> float:
    """The L2 norm of the whole model's gradient (see the module docstring); a collective.

    Args:
        stages: this rank's ``{stage: module}`` (``RankModel.stages``).
        groups: this rank's mesh, or None for a plain pipeline (no dp, no tp).
        ties: the pipeline's ties, ``{stage: parameter name}`` each (``RankModel.ties``).
        group: the group holding every rank of the model (None: the default group; with no
            process group at all the norm is this process's own).

    Returns:
        The same float on every rank.

    Raises:
        ConfigError: a tie names a parameter a stage lacks, or a gradient is sharded over
            ranks that are neither this rank's tp group nor its dp group.
    """
    axes = _axes(groups)
    ranks: dict[tuple[int, int], str] = {}  # (id(mesh), dim) -> "tp" / "dp" / ""
    norms = []
    for param in counted_parameters(stages, ties):
        if param.grad is not None:
            norm = _norm_share(param.grad, axes, ranks)
            if norm is not None:
                norms.append(norm)
    device = _reduce_device(group)
    total = torch.zeros((), dtype=torch.float64, device=device)
    if norms:
        total = torch.stack([n.to(device, torch.float64) for n in norms]).square().sum()
    if dist.is_initialized():
        dist.all_reduce(total, group=group)
    return math.sqrt(float(total))


def clip_grad_norm(
    stages: Mapping[int, nn.Module],
    max_norm: float,
    groups: MeshGroups | None = None,
    *,
    ties: Sequence[Mapping[int, str]] = (),
    group: dist.ProcessGroup | None = None,
) -> float:
    """Scale every gradient by ``min(1, max_norm / (norm + 1e-6))``, as torch's
    ``clip_grad_norm_`` does; return the norm before clipping (a collective).

    Every copy of a tied weight and every replica's gradient is scaled alike, so they stay
    equal. A NaN norm leaves the gradients as they are (they hold the NaN already).

    Raises:
        ConfigError: ``max_norm`` is not positive; as :func:`global_grad_norm`.

    Example (each rank, after the pipeline's step and the dp reduction)::

        norm = clip_grad_norm(model.stages, 1.0, groups, ties=model.ties)
    """
    if not max_norm > 0:
        raise ConfigError(f"--clip-grad {max_norm}: the gradient-norm limit must be positive")
    norm = global_grad_norm(stages, groups, ties=ties, group=group)
    coefficient = max_norm / (norm + EPSILON)
    if coefficient < 1.0:
        scale_grads(unique_parameters(stages), coefficient)
    return norm


def counted_parameters(
    stages: Mapping[int, nn.Module], ties: Sequence[Mapping[int, str]] = ()
) -> list[nn.Parameter]:
    """This rank's parameters whose gradients the global norm counts: each object once, tied
    copies only on the tie's lowest stage.

    Raises:
        ConfigError: a tie names a parameter its stage lacks.
    """
    owners: set[int] = set()
    copies: set[int] = set()
    for tie in ties:
        for stage, name in tie.items():
            if stage not in stages:
                continue
            param = dict(stages[stage].named_parameters(remove_duplicate=False)).get(name)
            if param is None:
                raise ConfigError(
                    f"tie {dict(tie)}: stage {stage} has no parameter {name!r}; pass the "
                    "pipeline's ties (RankModel.ties)"
                )
            (owners if stage == min(tie) else copies).add(id(param))
    skipped = copies - owners
    return [p for p in unique_parameters(stages) if id(p) not in skipped]


def _axes(groups: MeshGroups | None) -> _Axes:
    if groups is None:
        alone = (dist.get_rank(),) if dist.is_initialized() else (0,)
        return _Axes(0, 0, alone, alone)
    return _Axes(
        groups.dp_rank, groups.tp_rank,
        tuple(sorted(dist.get_process_group_ranks(groups.dp_group))),
        tuple(sorted(dist.get_process_group_ranks(groups.tp_group))),
    )


def _norm_share(
    grad: torch.Tensor, axes: _Axes, ranks: dict[tuple[int, int], str]
) -> torch.Tensor | None:
    """The L2 norm of this rank's share of ``grad`` (float32), or None when another rank
    counts it (a replica's copy)."""
    from torch.distributed.tensor import DTensor, Replicate

    sharded: set[str] = set()
    local = grad
    if isinstance(grad, DTensor):
        if any(p.is_partial() for p in grad.placements):
            placements = [Replicate() if p.is_partial() else p for p in grad.placements]
            grad = grad.redistribute(grad.device_mesh, placements)
        for dim, placement in enumerate(grad.placements):
            if placement.is_shard():
                sharded.add(_axis_of(grad, dim, axes, ranks))
        local = grad.to_local()
    if ("dp" not in sharded and axes.dp_rank) or ("tp" not in sharded and axes.tp_rank):
        return None
    norm: torch.Tensor = torch.linalg.vector_norm(local.detach(), dtype=torch.float32)
    return norm


def _axis_of(grad: torch.Tensor, dim: int, axes: _Axes, ranks: dict[tuple[int, int], str]) -> str:
    """``"tp"``, ``"dp"`` or ``""`` (one rank): which axis a ``DTensor``'s mesh dimension is."""
    mesh = grad.device_mesh  # type: ignore[attr-defined]
    key = (id(mesh), dim)
    if key not in ranks:
        along = tuple(sorted(dist.get_process_group_ranks(mesh.get_group(dim))))
        if len(along) == 1:
            ranks[key] = ""
        elif along == axes.tp_ranks:
            ranks[key] = "tp"
        elif along == axes.dp_ranks:
            ranks[key] = "dp"
        else:
            raise ConfigError(
                f"a gradient is sharded over ranks {list(along)}, which are neither this "
                f"rank's tp group {list(axes.tp_ranks)} nor its dp group "
                f"{list(axes.dp_ranks)}: pass the run's MeshGroups to the global norm"
            )
    return ranks[key]


def _reduce_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where the all-reduced sum lives: the current GPU for NCCL, else the host."""
    if dist.is_initialized() and "nccl" in str(dist.get_backend(group)) and \
            torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
