"""Per-stage costs and the link model the simulator charges.

All times are for one micro-batch through one (virtual) stage. ``Costs.per_stage`` is the
general form (stages may differ: a last stage carrying the LM head, say); ``Costs.uniform``
takes the costs of one micro-batch through one *full* rank's share of the model and divides
them by the number of chunks per rank, so a schedule with v chunks keeps the same total work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stagewise.errors import ConfigError
from stagewise.schedules.ir import Op, Schedule

__all__ = ["Costs", "Link"]


@dataclass(frozen=True)
class Link:
    """Point-to-point cost between two ranks: ``latency + bytes / bandwidth``.

    Attributes:
        latency: fixed time per transfer.
        bandwidth: bytes per time unit; ``None`` means transfers cost only the latency.
    """

    latency: float = 0.0
    bandwidth: float | None = None

    def __post_init__(self) -> None:
        if self.latency < 0:
            raise ConfigError(f"latency must be >= 0, got {self.latency}")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ConfigError(f"bandwidth must be > 0, got {self.bandwidth}")

    def transfer_time(self, num_bytes: float) -> float:
        if self.bandwidth is None or not num_bytes:
            return self.latency
        return self.latency + num_bytes / self.bandwidth


@dataclass(frozen=True)
class Costs:
    """Per-stage compute costs and sizes.

    Attributes:
        forward: F time of each stage.
        backward: full B time of each stage (input grad plus weight grad).
        weight: the weight-gradient part W of each stage's backward; I = backward - weight.
        activation_bytes: bytes one micro-batch keeps alive for backward in each stage.
        send_bytes: bytes of the activation (and of its gradient) crossing each stage boundary.
    """

    forward: tuple[float, ...]
    backward: tuple[float, ...]
    weight: tuple[float, ...]
    activation_bytes: tuple[float, ...] | None = None
    send_bytes: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.forward)
        for name in ("backward", "weight", "activation_bytes", "send_bytes"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ConfigError(f"costs: {name} has {len(values)} stages, forward has {n}")
        for s in range(n):
            f, b, w = self.forward[s], self.backward[s], self.weight[s]
            if f < 0 or b < 0 or w < 0:
                raise ConfigError(
                    f"costs of stage {s} must be >= 0, got forward={f}, backward={b}, weight={w}"
                )
            if w > b:
                raise ConfigError(
                    f"stage {s}: weight-gradient time {w} exceeds the whole backward {b}: "
                    "W is part of B, so give weight <= backward"
                )

    @property
    def num_stages(self) -> int:
        return len(self.forward)

    def duration(self, stage: int, op: Op) -> float:
        """Time of ``op`` on ``stage``."""
        if op is Op.F:
            return self.forward[stage]
        if op is Op.B:
            return self.backward[stage]
        if op is Op.W:
            return self.weight[stage]
        return self.backward[stage] - self.weight[stage]

    @classmethod
    def per_stage(
        cls,
        forward: Sequence[float],
        backward: Sequence[float],
        weight: Sequence[float] | None = None,
        activation_bytes: Sequence[float] | None = None,
        send_bytes: Sequence[float] | None = None,
    ) -> Costs:
        """Costs given stage by stage; ``weight`` defaults to half of each backward."""
        return cls(
            forward=tuple(float(x) for x in forward),
            backward=tuple(float(x) for x in backward),
            weight=tuple(float(x) for x in (weight or [b / 2 for b in backward])),
            activation_bytes=None if activation_bytes is None else tuple(activation_bytes),
            send_bytes=None if send_bytes is None else tuple(send_bytes),
        )

    @classmethod
    def uniform(
        cls,
        schedule: Schedule,
        forward: float = 1.0,
        backward: float = 2.0,
        weight: float | None = None,
        activation_bytes: float | None = None,
        send_bytes: float | None = None,
    ) -> Costs:
        """Same costs on every rank; given per full rank share, split evenly over its chunks.

        ``weight`` (the W part of ``backward``) defaults to half the backward.
        """
        v = schedule.num_chunks
        w = backward / 2 if weight is None else weight
        n = schedule.num_stages
        return cls.per_stage(
            forward=[forward / v] * n,
            backward=[backward / v] * n,
            weight=[w / v] * n,
            activation_bytes=None if activation_bytes is None else [activation_bytes / v] * n,
            send_bytes=None if send_bytes is None else [send_bytes] * n,
        )
