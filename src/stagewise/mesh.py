"""The process mesh as plain data: pipeline x data x tensor parallelism, ``pp=2,dp=2,tp=2``.

One type for every consumer: the planner ranks layouts made of it, a run file's ``[mesh]``
section is one, and the runtime builds torch's ``DeviceMesh`` from one
(:func:`stagewise.runtime.parallel.mesh.build_mesh`). Pure Python: no torch import.

Axes: ``pp`` pipeline ranks per replica (the schedule's ranks), ``dp`` data-parallel replicas,
``tp`` tensor-parallel ranks per pipeline rank. The world is a ``dp x pp x tp`` grid, tp
innermost (neighbouring ranks, one node): global rank ``(dp_rank * pp + pp_rank) * tp +
tp_rank``. ``dp_shard`` makes the replicas shard weights, gradients and optimizer state over dp
(FSDP2, written ``fsdp=N`` in place of ``dp=N``) instead of each holding all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stagewise.errors import ConfigError

__all__ = ["AXES", "Mesh"]

AXES = ("pp", "dp", "tp")
_SHARDED_DP = "fsdp"  # in mesh text, fsdp=N is dp=N with dp_shard


@dataclass(frozen=True)
class Mesh:
    """The sizes of the mesh axes.

    Attributes:
        pp: pipeline ranks per replica (the schedule's ranks).
        dp: data-parallel replicas (each on its own slice of the global batch).
        tp: tensor-parallel ranks per pipeline rank (each block sharded over them).
        dp_shard: the replicas shard weights, gradients and optimizer state over dp (FSDP2)
            instead of each holding all and all-reducing the gradients.

    Raises:
        ConfigError: a size that is not an integer >= 1.

    Example:
        >>> mesh = Mesh(pp=2, dp=2, tp=2)
        >>> mesh.world_size, mesh.text()
        (8, 'pp=2,dp=2,tp=2')
    """

    pp: int = 1
    dp: int = 1
    tp: int = 1
    dp_shard: bool = False

    def __post_init__(self) -> None:
        for axis in AXES:
            size = getattr(self, axis)
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ConfigError(
                    f"mesh axis {axis}={size!r}: every axis size must be an integer >= 1"
                )
        if not isinstance(self.dp_shard, bool):
            raise ConfigError(f"mesh dp_shard must be true or false, got {self.dp_shard!r}")

    @property
    def world_size(self) -> int:
        """Processes the mesh needs: ``pp * dp * tp``."""
        return self.pp * self.dp * self.tp

    def text(self) -> str:
        """The ``--mesh`` spelling: ``pp=2,dp=2`` (``fsdp=`` when sharded, ``,tp=T`` when T > 1).

        Example:
            >>> Mesh(pp=2, dp=4, dp_shard=True).text()
            'pp=2,fsdp=4'
        """
        dp_name = _SHARDED_DP if self.dp_shard else "dp"
        return f"pp={self.pp},{dp_name}={self.dp}" + (f",tp={self.tp}" if self.tp > 1 else "")

    def to_dict(self) -> dict[str, Any]:
        """The sizes as a run file's ``[mesh]`` table (``dp_shard`` only when set)."""
        values: dict[str, Any] = {"pp": self.pp, "dp": self.dp, "tp": self.tp}
        if self.dp_shard:
            values["dp_shard"] = True
        return values

    @classmethod
    def parse(cls, text: str, world_size: int | None = None) -> Mesh:
        """Parse ``"pp=2,dp=2,tp=2"`` (axes in any order; a missing axis has size 1).

        ``fsdp=N`` in place of ``dp=N`` gives ``N`` sharded replicas (``dp_shard=True``).

        Args:
            text: comma-separated ``axis=size`` pairs.
            world_size: when given, the product of the sizes must equal it.

        Raises:
            ConfigError: an unknown or repeated axis, a size that is not an integer >= 1, or a
                product other than ``world_size``.

        Example:
            >>> Mesh.parse("pp=2,fsdp=2")
            Mesh(pp=2, dp=2, tp=1, dp_shard=True)
        """
        sizes: dict[str, int] = {}
        for part in text.split(","):
            axis, size = _parse_axis(text, part, sizes)
            sizes[axis] = size
        shard = _SHARDED_DP in sizes
        if shard:
            sizes["dp"] = sizes.pop(_SHARDED_DP)
        mesh = cls(**sizes, dp_shard=shard)
        if world_size is not None and mesh.world_size != world_size:
            raise ConfigError(
                f"mesh {text!r} needs pp*dp*tp = {mesh.world_size} ranks but the world has "
                f"{world_size}: start {mesh.world_size} ranks or change the sizes"
            )
        return mesh


def _parse_axis(text: str, part: str, seen: dict[str, int]) -> tuple[str, int]:
    """One ``axis=size`` pair of mesh ``text``, checked against the axes ``seen`` so far."""
    axis, sep, value = (s.strip() for s in part.partition("="))
    if not sep or not axis:
        raise ConfigError(
            f"mesh {text!r}: {part.strip()!r} is not axis=size; write e.g. pp=2,dp=2,tp=2"
        )
    if axis not in (*AXES, _SHARDED_DP):
        raise ConfigError(
            f"mesh {text!r}: unknown axis {axis!r}; the axes are pp, dp (or fsdp) and tp"
        )
    if axis in seen:
        raise ConfigError(f"mesh {text!r}: axis {axis} is given twice; give it once")
    if {axis, *seen} >= {"dp", _SHARDED_DP}:
        raise ConfigError(
            f"mesh {text!r}: dp and fsdp are the same axis (replicas, whole or sharded); "
            "give one of them"
        )
    try:
        size = int(value)
    except ValueError:
        raise ConfigError(
            f"mesh {text!r}: size {value!r} of {axis} is not an integer; write {axis}=2"
        ) from None
    if size < 1:
        raise ConfigError(f"mesh {text!r}: {axis}={size}; every size must be >= 1")
    return axis, size
