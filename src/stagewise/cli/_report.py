"""Turn a simulated Timeline into the rows and JSON objects the verbs print."""

from __future__ import annotations

from typing import Any

from stagewise.schedules import Schedule
from stagewise.sim import Timeline

__all__ = ["fmt_fraction", "timeline_summary"]


def timeline_summary(schedule: Schedule, timeline: Timeline) -> dict[str, Any]:
    """The JSON object `simulate --json` prints (also used by `compare` and `bubble`)."""
    bubble = timeline.bubble()
    per_rank = []
    for stats in timeline.rank_stats():
        row: dict[str, Any] = {
            "rank": stats.rank,
            "busy": stats.busy,
            "idle": stats.idle,
            "peak_activations": stats.peak_activations,
        }
        if stats.peak_activation_bytes is not None:
            row["peak_activation_bytes"] = stats.peak_activation_bytes
        per_rank.append(row)
    return {
        "schedule": schedule.name,
        "num_ranks": schedule.num_ranks,
        "num_stages": schedule.num_stages,
        "num_microbatches": schedule.num_microbatches,
        "num_chunks": schedule.num_chunks,
        "makespan": timeline.makespan,
        "bubble": {"of_step": bubble.of_step, "vs_ideal": bubble.vs_ideal},
        "per_rank": per_rank,
    }


def fmt_fraction(value: float) -> str:
    """A fraction as a percentage with two decimals."""
    return f"{value:.2%}"
