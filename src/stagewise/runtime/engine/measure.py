"""Turn what the ranks recorded into a measured ``Timeline``, costs and memory figures.

The measured Timeline is the same type the simulator returns (``source="measured"``,
``time_unit="s"``), so bubble, utilisation, pictures and traces come from the same code. The
per-stage costs measured here feed ``stagewise.sim.simulate`` for the prediction that the run is
compared with.

Times are ``time.perf_counter()`` values, one clock for all processes of a machine; across
machines each rank's clock is used as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import mean

from stagewise.schedules.ir import Op, Schedule
from stagewise.sim.costs import Costs
from stagewise.sim.timeline import Event, Timeline

__all__ = ["link_latency", "measured_costs", "measured_timeline", "peak_saved_bytes"]


def measured_timeline(
    schedule: Schedule,
    events: Sequence[Event],
    saved_bytes: dict[tuple[int, int], int] | None = None,
) -> Timeline:
    """A measured Timeline of one step from every rank's events (times made to start at 0).

    ``saved_bytes`` ((stage, micro-batch) -> bytes saved for backward) gives the Timeline its
    per-stage ``activation_bytes`` (mean over micro-batches).
    """
    origin = min(e.start for e in events)
    shifted = tuple(
        Event(e.rank, e.stage, e.op, e.microbatch, e.start - origin, e.end - origin)
        for e in events
    )
    return Timeline.of(
        schedule,
        shifted,
        source="measured",
        time_unit="s",
        activation_bytes=_stage_bytes(schedule, saved_bytes) if saved_bytes else None,
    )


def _stage_bytes(schedule: Schedule, saved: dict[tuple[int, int], int]) -> tuple[float, ...]:
    sizes = []
    for stage in range(schedule.num_stages):
        values = [b for (s, _), b in saved.items() if s == stage]
        sizes.append(float(mean(values)) if values else 0.0)
    return tuple(sizes)


def measured_costs(timelines: Sequence[Timeline]) -> Costs:
    """Per-stage mean F, backward (B, or I + W) and W times over the events of ``timelines``.

    A schedule without split backward has no W measurement; W is then left at half of B (the
    simulator only uses it for split schedules). Activation bytes come from the first timeline.
    """
    first = timelines[0]
    times: dict[tuple[int, Op], list[float]] = {}
    for timeline in timelines:
        for e in timeline.events:
            times.setdefault((e.stage, e.op), []).append(e.duration)

    def average(stage: int, op: Op) -> float:
        values = times.get((stage, op))
        return mean(values) if values else 0.0

    forward, backward, weight = [], [], []
    for stage in range(first.num_stages):
        forward.append(average(stage, Op.F))
        if (stage, Op.I) in times or (stage, Op.W) in times:
            w = average(stage, Op.W)
            backward.append(average(stage, Op.I) + w)
            weight.append(w)
        else:
            b = average(stage, Op.B)
            backward.append(b)
            weight.append(b / 2)
    return Costs.per_stage(
        forward, backward, weight, activation_bytes=first.activation_bytes
    )


def peak_saved_bytes(
    timeline: Timeline, saved_bytes: dict[tuple[int, int], int], rank: int
) -> int:
    """Most bytes saved for backward alive at once on ``rank`` during the measured step.

    A forward's bytes count from its start until the backward that frees them ends (B, or W
    when that micro-batch's backward is split; a schedule may mix both), using each
    micro-batch's own measured bytes.
    """
    changes = []
    for e in timeline.rank_events(rank):
        size = saved_bytes.get((e.stage, e.microbatch), 0)
        if e.op is Op.F:
            changes.append((e.start, 1, size))
        elif e.op is Op.B or e.op is Op.W:
            changes.append((e.end, 0, -size))
    level = peak = 0
    for _, _, delta in sorted(changes):
        level += delta
        peak = max(peak, level)
    return peak


def link_latency(timelines: Sequence[Timeline]) -> float:
    """Median delay a rank waiting for another rank's tensor sees after the sender finished.

    For each action whose input comes from a stage on another rank and whose rank was idle
    when that input's producer finished, the delay is from the producer's end to the action's
    start: transfer plus wake-up, what the simulator's ``Link(latency=...)`` stands for.
    Transfers that land while the receiver is busy cost nothing and are not counted.
    Returns 0.0 when no action waited. Needs one clock for all ranks (one machine).
    """
    delays = []
    for timeline in timelines:
        ends: dict[tuple[int, Op, int], Event] = {
            (e.stage, Op.B if e.op is Op.I else e.op, e.microbatch): e for e in timeline.events
        }
        for rank in range(timeline.num_ranks):
            previous_end = None
            for e in timeline.rank_events(rank):
                producer = None
                if e.op is Op.F and e.stage > 0:
                    producer = ends.get((e.stage - 1, Op.F, e.microbatch))
                elif e.op.is_backward and e.stage < timeline.num_stages - 1:
                    producer = ends.get((e.stage + 1, Op.B, e.microbatch))
                waited = previous_end is None or previous_end <= (producer.end if producer else 0)
                if producer is not None and producer.rank != rank and waited:
                    delays.append(max(0.0, e.start - producer.end))
                previous_end = e.end
    if not delays:
        return 0.0
    delays.sort()
    return delays[len(delays) // 2]
