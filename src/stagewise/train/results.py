"""What each rank hands back at the end of a run, as named data (gathered on rank 0)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stagewise.sim.timeline import Event

__all__ = ["RankResult", "StepRecord"]


@dataclass(frozen=True)
class StepRecord:
    """One timed step on one rank.

    Attributes:
        events: the rank's actions with their start and end (seconds since the step began).
        saved_bytes: bytes saved for backward per ``(stage, microbatch)``.
    """

    events: tuple[Event, ...]
    saved_bytes: dict[tuple[int, int], int]


@dataclass
class RankResult:
    """One rank's share of the report.

    Attributes:
        pp_rank, dp_rank, tp_rank: where the rank sits in the mesh.
        losses: the mean loss of every step so far (resumed ones included); empty on ranks
            without the last stage.
        step_seconds: wall time of each step this run made.
        records: the timed steps after the first (warm-up) one.
        evals: on last-stage ranks, ``{"step", "loss", "perplexity"}`` of each evaluation.
        peak_memory_bytes: the rank's peak memory (GPU allocated, or the process's max RSS).
        state_bytes: the bytes of the rank's model states at the end (``metrics.state_bytes``).
    """

    pp_rank: int
    dp_rank: int
    tp_rank: int
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    records: list[StepRecord] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    peak_memory_bytes: int = 0
    state_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def first_replica(self) -> bool:
        """On the first replica's first tp shard (whose timelines stand for all)."""
        return self.dp_rank == 0 and self.tp_rank == 0
