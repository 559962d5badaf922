"""Pipeline x data x tensor parallelism on a device mesh: ``--mesh pp=2,dp=2,tp=2``.

The world is a ``dp x pp x tp`` grid (torch's ``DeviceMesh`` with dimensions
``("dp", "pp", "tp")``, tp innermost so a tp group is neighbouring ranks, as on one node):
global rank ``r = (dp_rank * pp + pp_rank) * tp + tp_rank``. Each replica runs the pipeline on
its own slice of the global batch (the batch split evenly over the replicas); within a replica
the ``tp`` ranks of a pipeline rank hold the same stages, each block sharded over them (see
``tensor_parallel``), and all see the same slice. There is one pipeline per (replica, tp rank):
its ``pp_group`` links the ranks with the same dp and tp rank. Afterwards every gradient is
averaged over the dp group (one flattened ``all_reduce`` per stage; a ``DTensor`` gradient
reduces its local shard, which lines up across replicas). Because the loss is a mean and the
slices are equal, the averaged gradients equal one process running the whole global batch with
a mean loss.

:func:`average_gradients` reduces after the step; :class:`OverlappedAverage` starts each
stage's reduction (asynchronously) as soon as the rank's schedule has finished that stage's
last backward or weight-gradient action, so it overlaps the rest of the cooldown.

Sharded data parallelism (``fsdp=2`` in place of ``dp=2``, ``Mesh(dp_shard=True)``): instead
of every replica keeping every weight, :func:`shard_replicas` applies torch's FSDP2
(``fully_shard``) over the dp axis to each layer of each stage: a replica keeps a 1/dp shard of
each weight and of its optimizer state, gathers a layer's weights for its forward and backward,
and reduce-scatters (averages) its gradients in each backward, so no averaging call follows.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from stagewise.errors import ConfigError
from stagewise.mesh import Mesh
from stagewise.schedules.ir import Action, Op, Schedule

__all__ = [
    "Mesh",
    "MeshGroups",
    "OverlappedAverage",
    "average_gradients",
    "average_loss",
    "build_mesh",
    "check_shard_replicas",
    "replica_slice",
    "shard_replicas",
]

@dataclass(frozen=True)
class MeshGroups:
    """This rank's place in the mesh.

    Attributes:
        spec: the mesh sizes.
        pp_group: the ranks of this rank's pipeline (same replica, same tp rank; pass it to
            ``Pipeline(group=...)``).
        dp_group: the ranks holding the same shard of the same stages in every replica.
        pp_rank: this rank's row of the schedule (its rank in ``pp_group``).
        dp_rank: this rank's replica (its rank in ``dp_group``).
        tp_group: the ranks sharing this rank's stages (same replica, same pipeline rank).
        tp_rank: this rank's shard (its rank in ``tp_group``).
        tp_mesh: the 1-D tensor-parallel ``DeviceMesh`` (pass it to
            ``apply_tensor_parallel``); always a mesh, of size 1 when ``tp=1`` (then
            ``apply_tensor_parallel`` leaves the stages as they are).
        dp_mesh: the 1-D data-parallel ``DeviceMesh`` (what :func:`shard_replicas` shards
            over), of size 1 when ``dp=1``.
    """

    spec: Mesh
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    tp_rank: int
    tp_mesh: DeviceMesh
    dp_mesh: DeviceMesh


def build_mesh(spec: Mesh, device: str = "cpu") -> MeshGroups:
    """Build the ``(dp, pp, tp)`` device mesh over the default group; a collective on every rank.

    Args:
        spec: the mesh's sizes.
        device: ``"cpu"`` (gloo) or ``"cuda"`` (the default group is NCCL; the pipeline's
            ``pp_group`` is then a gloo group over the same ranks, which the pipeline's
            transfers need, made here because every rank must create every group).

    Raises:
        ConfigError: the default group's size is not ``spec.world_size``.
    """
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world != spec.world_size:
        raise ConfigError(
            f"mesh pp={spec.pp},dp={spec.dp},tp={spec.tp} needs {spec.world_size} ranks but the "
            f"world has {world}: start {spec.world_size} ranks or change the sizes"
        )
    mesh = init_device_mesh(
        device, (spec.dp, spec.pp, spec.tp), mesh_dim_names=("dp", "pp", "tp")
    )
    pp_group, dp_group, tp_group = (mesh.get_group(axis) for axis in ("pp", "dp", "tp"))
    if _backend(pp_group) != "gloo":
        pp_group = _gloo_pp_group(spec)
    groups = MeshGroups(
        spec, pp_group, dp_group, dist.get_rank(pp_group), dist.get_rank(dp_group),
        tp_group, dist.get_rank(tp_group), mesh["tp"], mesh["dp"],
    )
    expected = (groups.dp_rank * spec.pp + groups.pp_rank) * spec.tp + groups.tp_rank
    assert dist.get_rank() == expected, "unexpected mesh layout"
    return groups


def _backend(group: dist.ProcessGroup) -> str:
    """The group's backend (a seam: the tests make a gloo mesh look like NCCL)."""
    return str(dist.get_backend(group))


def _gloo_pp_group(spec: Mesh) -> dist.ProcessGroup:
    """This rank's pipeline as a gloo group (every rank creates every pipeline's group)."""
    mine: dist.ProcessGroup | None = None
    rank = dist.get_rank()
    for dp in range(spec.dp):
        for tp in range(spec.tp):
            ranks = [(dp * spec.pp + pp) * spec.tp + tp for pp in range(spec.pp)]
            group = dist.new_group(ranks=ranks, backend="gloo")
            if rank in ranks:
                mine = group
    assert mine is not None
    return mine


def replica_slice(batch: torch.Tensor, dp: int, dp_rank: int) -> torch.Tensor:
    """Replica ``dp_rank``'s equal share of the global ``batch`` (rows along dimension 0).

    Raises:
        ConfigError: the batch's rows do not divide evenly over the ``dp`` replicas.

    Example:
        >>> replica_slice(torch.arange(6), 3, 1).tolist()
        [2, 3]
    """
    rows = batch.shape[0]
    if rows % dp:
        raise ConfigError(
            f"global batch of {rows} rows does not split evenly over dp={dp} replicas: "
            f"use a batch size that is a multiple of {dp}"
        )
    share = rows // dp
    return batch[dp_rank * share : (dp_rank + 1) * share]


def average_gradients(modules: Iterable[nn.Module], group: dist.ProcessGroup) -> None:
    """Average every parameter's ``.grad`` over ``group``: one flattened all-reduce per module.

    A parameter without a gradient counts as zeros, so every replica sends the same layout.
    """
    size = dist.get_world_size(group)
    if size == 1:
        return
    modules = list(modules)
    _refuse_sharded(modules)
    for module in modules:
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            continue
        flat = _flat_local_grads(params)
        dist.all_reduce(flat, group=group)
        _write_mean(params, flat, size)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A ``DTensor``'s local shard (the same storage), or ``tensor`` itself."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor
    with torch.no_grad():
        return tensor.to_local()


def _flat_local_grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Every parameter's local gradient (zeros when it has none) in one flat tensor."""
    grads = [_local(p.grad) if p.grad is not None else torch.zeros_like(_local(p)) for p in params]
    return torch.cat([g.reshape(-1) for g in grads])


def _write_mean(params: list[torch.nn.Parameter], flat: torch.Tensor, size: int) -> None:
    """Divide the all-reduced ``flat`` sum by ``size`` and put each slice in its ``.grad``."""
    flat /= size
    offset = 0
    for p in params:
        local = _local(p)
        n = local.numel()
        mean = flat[offset : offset + n].view_as(local)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        _local(p.grad).copy_(mean)
        offset += n


class OverlappedAverage:
    """Average gradients over ``group`` stage by stage while the pipeline step still runs.

    Pass :meth:`on_action` to ``Pipeline(on_action=...)`` (it is called before each action, so
    when it sees action ``i`` the actions before ``i`` are done) and call :meth:`finish` after
    ``Pipeline.step``: it starts what is left, waits for every reduction and writes the means
    into ``.grad``. Not for tied weights (the pipeline changes their gradients at the end of
    the step, after these reductions started).

    Args:
        schedule: the pipeline's schedule.
        rank: this rank's row of it (its pipeline rank).
        stages: this rank's ``{stage: module}``.
        group: the data-parallel group (the same stages in every replica).
    """

    def __init__(
        self,
        schedule: Schedule,
        rank: int,
        stages: Mapping[int, nn.Module],
        group: dist.ProcessGroup,
    ) -> None:
        _refuse_sharded(stages.values())
        self._group = group
        self._size = dist.get_world_size(group)
        self._params = {
            s: [p for p in m.parameters() if p.requires_grad] for s, m in stages.items()
        }
        last: dict[int, int] = {}
        for index, action in enumerate(schedule.actions[rank]):
            if action.op in (Op.B, Op.W):
                last[action.stage] = index
        # stage -> index of the action after which its gradients are final
        self._ready_after = {index: stage for stage, index in last.items()}
        self._count = 0
        self._pending: list[tuple[int, torch.Tensor, dist.Work]] = []
        self._started: set[int] = set()

    def on_action(self, action: Action) -> None:
        """Start the reduction of a stage whose last gradient action just finished."""
        stage = self._ready_after.get(self._count - 1)
        if stage is not None:
            self._start(stage)
        self._count += 1

    def finish(self) -> None:
        """Start the remaining reductions, wait for all, write the means into ``.grad``."""
        for stage in self._params:
            if stage not in self._started:
                self._start(stage)
        for stage, flat, work in self._pending:
            work.wait()
            _write_mean(self._params[stage], flat, self._size)
        self._pending, self._started, self._count = [], set(), 0

    def _start(self, stage: int) -> None:
        self._started.add(stage)
        params = self._params[stage]
        if not params or self._size == 1:
            return
        flat = _flat_local_grads(params)
        work = dist.all_reduce(flat, group=self._group, async_op=True)
        assert work is not None
        self._pending.append((stage, flat, work))


def shard_replicas(
    stages: Mapping[int, nn.Module],
    groups: MeshGroups,
    schedule: Schedule,
    ties: Sequence[Mapping[int, str]] = (),
    param_dtype: torch.dtype | None = None,
) -> None:
    """Shard this rank's stages over the dp axis with FSDP2 (``fully_shard``), in place.

    Each layer of each stage (an ``nn.Sequential``) becomes its own FSDP unit, gathered for
    its forward and backward and resharded after; the stage itself is the root unit. Call it
    after ``apply_tensor_parallel`` and before making the ``Pipeline`` and the optimizer; do
    not average gradients afterwards (the reduce-scatter already averaged them over dp).

    Args:
        stages: this rank's ``{stage: module}``.
        groups: this rank's mesh (its ``dp_mesh`` is used).
        schedule: the schedule the stages run (checked for split backward).
        ties: the pipeline's tied weights (refused: tied copies are summed as whole tensors).
        param_dtype: mixed precision (FSDP2's ``MixedPrecisionPolicy``): the shards stay
            fp32 (the master weights the optimizer updates) and are gathered in this dtype,
            so the all-gather moves half the bytes and the layers compute on bf16 weights;
            gradients are reduce-scattered and kept in fp32. None: no cast.

    Raises:
        ConfigError: as :func:`check_shard_replicas`.
    """
    from torch.distributed.fsdp import fully_shard

    check_shard_replicas(schedule, ties)
    # FSDP2 warns once per unit whose output is a view (a reshape in the head, a block's last
    # op): an in-place op on it would skip the pre-backward all-gather. The pipeline never
    # changes a stage's output in place (it sends it, or feeds it to the next layer, and calls
    # backward on it), so the warning says nothing about these runs.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    policy = fsdp_policy(param_dtype)
    for module in stages.values():
        for layer in module.children():
            fully_shard(layer, mesh=groups.dp_mesh, mp_policy=policy)
        fully_shard(module, mesh=groups.dp_mesh, mp_policy=policy)


def fsdp_policy(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """FSDP2's mixed-precision policy for ``param_dtype``: None keeps FSDP2's default (no
    cast anywhere, so an fp32 run is unchanged); bf16 gathers the fp32 shards as bf16 and
    reduce-scatters fp32 gradients into the fp32 master shards."""
    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def check_shard_replicas(schedule: Schedule, ties: Sequence[Mapping[int, str]] = ()) -> None:
    """Check, before any process starts, that :func:`shard_replicas` can run ``schedule``.

    Raises:
        ConfigError: the schedule splits backward into I and W (zero-bubble schedules), or
            there are tied weights.
    """
    split = sorted({a.op.value for row in schedule.actions for a in row if a.op in (Op.I, Op.W)})
    if split:
        raise ConfigError(
            f"sharded data parallelism (fsdp) cannot run schedule {schedule.name!r}: it splits "
            f"backward into {' and '.join(split)}, and FSDP frees the gathered weights after "
            "the input-gradient pass that the weight-gradient pass still needs; use a schedule "
            "without I/W (1f1b, interleaved-1f1b, gpipe) or dp instead of fsdp"
        )
    if ties:
        raise ConfigError(
            "sharded data parallelism (fsdp) does not support weights tied across stages "
            "(their copies are summed whole): use dp instead of fsdp, or untie them"
        )


def _refuse_sharded(modules: Iterable[nn.Module]) -> None:
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in modules):
        raise ConfigError(
            "these stages are sharded over dp (fsdp): their gradients are already averaged "
            "by FSDP's reduce-scatter; do not average them again"
        )


def average_loss(loss: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The mean of each replica's ``loss`` over ``group`` (call on the last stage's ranks)."""
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    return total / dist.get_world_size(group)
