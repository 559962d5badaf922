"""The run's report, built on rank 0 from every rank's :class:`RankResult`."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from stagewise.runtime.engine.measure import (
    link_latency,
    measured_costs,
    measured_timeline,
    peak_saved_bytes,
)
from stagewise.sim.costs import Link
from stagewise.sim.simulate import simulate
from stagewise.sim.timeline import Timeline
from stagewise.train.job import Job
from stagewise.train.results import RankResult

__all__ = ["TrainReport", "build_report"]


@dataclass
class TrainReport:
    """Everything the run measured (``as_json`` gives the ``--json`` output)."""

    schedule: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    steps: int
    tokens_per_step: int
    losses: list[float]
    step_seconds: list[float]
    tokens_per_second: float
    measured_step: float
    predicted_step: float
    measured_bubble: dict[str, float]
    predicted_bubble: dict[str, float]
    measured_activation_bytes: list[int]
    predicted_activation_bytes: list[float]
    stage_costs: dict[str, list[float]]
    link_latency: float
    timeline: Timeline = field(repr=False)
    predicted: Timeline = field(repr=False)
    mesh: dict[str, int | bool] | None = None
    resumed_from: int | None = None
    device: str = "cpu"
    eval: list[dict[str, float]] = field(default_factory=list)
    exported: str | None = None
    peak_memory_bytes: list[int] = field(default_factory=list)
    state_bytes: list[dict[str, int]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The report without the timelines, for ``--json``."""
        data = asdict(self)
        data.pop("timeline")
        data.pop("predicted")
        return data


def build_report(job: Job, results: list[RankResult], seq_len: int,
                 first_step: int) -> TrainReport:
    """Losses from the last stage, step times from the slowest rank, timelines and memory
    from the first replica's first tp shard (the others run the same), and the simulator's
    prediction from the measured per-stage costs."""
    schedule, config = job.schedule, job.config
    tokens = config.batch.global_batch * seq_len * config.training.grad_accum
    losses = next(r.losses for r in results if r.losses)
    evals = next((r.evals for r in results if r.evals), [])
    ran = config.training.steps - first_step
    step_seconds = [max(r.step_seconds[i] for r in results) for i in range(ran)]
    timelines, saved_per_step = _timelines(job, [r for r in results if r.first_replica], ran)
    # The step of median length stands for the run (pictures, bubble, memory).
    order = sorted(range(len(timelines)), key=lambda i: timelines[i].makespan)
    typical = order[len(order) // 2]
    timeline, saved = timelines[typical], saved_per_step[typical]
    costs = measured_costs(timelines)
    latency = link_latency(timelines)
    predicted = replace(simulate(schedule, costs, Link(latency=latency)), time_unit="s")
    mesh = config.mesh
    return TrainReport(
        schedule=schedule.name, num_ranks=schedule.num_ranks, num_stages=schedule.num_stages,
        num_microbatches=schedule.num_microbatches, steps=config.training.steps,
        tokens_per_step=tokens, losses=losses, step_seconds=step_seconds,
        tokens_per_second=tokens / statistics.median(step_seconds[1:]),
        measured_step=statistics.median(t.makespan for t in timelines),
        predicted_step=predicted.makespan,
        measured_bubble=_bubble(timeline), predicted_bubble=_bubble(predicted),
        measured_activation_bytes=[
            peak_saved_bytes(timeline, saved, r) for r in range(schedule.num_ranks)],
        predicted_activation_bytes=[
            predicted.peak_activations(r, in_bytes=True) for r in range(schedule.num_ranks)],
        stage_costs={"forward": list(costs.forward), "backward": list(costs.backward),
                     "weight": list(costs.weight)},
        link_latency=latency, timeline=timeline, predicted=predicted,
        resumed_from=first_step or None, device=config.launch.device, eval=evals,
        peak_memory_bytes=[r.peak_memory_bytes for r in results],
        state_bytes=[r.state_bytes for r in results],
        mesh={"pp": mesh.pp, "dp": mesh.dp, "tp": mesh.tp, "fsdp": mesh.dp_shard},
    )


def _timelines(job: Job, results: list[RankResult],
               ran: int) -> tuple[list[Timeline], list[dict[tuple[int, int], int]]]:
    """Each timed step's measured timeline over the pipeline's ranks, and its saved bytes."""
    timelines, saved_per_step = [], []
    for step in range(ran - 1):
        events = [e for r in results for e in r.records[step].events]
        saved: dict[tuple[int, int], int] = {}
        for r in results:
            saved.update(r.records[step].saved_bytes)
        timelines.append(measured_timeline(job.schedule, events, saved))
        saved_per_step.append(saved)
    return timelines, saved_per_step


def _bubble(timeline: Timeline) -> dict[str, float]:
    bubble = timeline.bubble()
    return {"of_step": bubble.of_step, "vs_ideal": bubble.vs_ideal}
