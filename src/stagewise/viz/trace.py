"""A Timeline as Chrome/Perfetto trace JSON (open it in ui.perfetto.dev or chrome://tracing).

One process is the pipeline (named after the schedule and whether the times were simulated or
measured), one thread per rank (``rank r``, sorted by rank). Every action is a complete event
(``"ph": "X"``) named by its text form (``2F0``), with category = op and args stage,
microbatch, op and chunk. Every transfer between ranks (an activation to the next stage's
forward, a gradient to the previous stage's backward) is a flow arrow from the action that
produced it to the one that used it (``"ph": "s"`` / ``"f"`` pairs). Live activations per rank
are counter events (``"ph": "C"``), one track per rank and unit.

Trace times are microseconds from the first action's start, rounded to whole nanoseconds (the
resolution Perfetto keeps), so back-to-back actions on a rank never overlap after rounding.
Seconds convert exactly; the simulator's cost units have no physical size, so one cost unit is
drawn as 1 ms (1000 us), which the trace's metadata says.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from stagewise.schedules.ir import Op
from stagewise.sim.timeline import Event, Timeline
from stagewise.viz._common import chunk_numbers, collapse_steps

__all__ = [
    "MICROSECONDS_PER_COST_UNIT",
    "chrome_trace",
    "microseconds_per_unit",
    "write_chrome_trace",
]

MICROSECONDS_PER_COST_UNIT = 1000.0
PID = 0
MIB = 2.0**20


def microseconds_per_unit(timeline: Timeline) -> float:
    """How many trace microseconds one unit of ``timeline``'s time is."""
    if timeline.time_unit == "s":
        return 1e6
    return MICROSECONDS_PER_COST_UNIT


def chrome_trace(timeline: Timeline) -> dict[str, Any]:
    """The Chrome/Perfetto trace of ``timeline`` as a JSON-ready dict.

    Returns:
        ``{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}`` with metadata
        events, one ``X`` event per action, flow events for transfers between ranks and ``C``
        counter events of live activations.

    Example:
        >>> from stagewise.schedules import build
        >>> from stagewise.sim import simulate
        >>> trace = chrome_trace(simulate(build("gpipe", num_ranks=2, num_microbatches=2)))
        >>> sorted({e["ph"] for e in trace["traceEvents"]})
        ['C', 'M', 'X', 'f', 's']
    """
    clock = _Clock(timeline.start, microseconds_per_unit(timeline))
    events = (
        _metadata(timeline, clock.scale)
        + _actions(timeline, clock)
        + _flows(timeline, clock)
        + _counters(timeline, clock)
    )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": _about(timeline, clock.scale),
    }


class _Clock:
    """Timeline times -> trace microseconds from ``origin``, on whole nanoseconds."""

    def __init__(self, origin: float, scale: float) -> None:
        self.origin = origin
        self.scale = scale

    def nanoseconds(self, time: float) -> int:
        return round((time - self.origin) * self.scale * 1000)

    def __call__(self, time: float) -> float:
        return self.nanoseconds(time) / 1000

    def span(self, event: Event) -> tuple[float, float]:
        """``(ts, dur)`` of ``event``; ts + dur is exactly the rounded end."""
        start, end = self.nanoseconds(event.start), self.nanoseconds(event.end)
        return start / 1000, (end - start) / 1000

    def middle(self, event: Event) -> float:
        return (self.nanoseconds(event.start) + self.nanoseconds(event.end)) // 2 / 1000


def write_chrome_trace(timeline: Timeline, path: str | os.PathLike[str]) -> Path:
    """Write :func:`chrome_trace` of ``timeline`` to ``path`` as JSON; returns the Path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(chrome_trace(timeline)), encoding="utf-8")
    return out


def _about(timeline: Timeline, scale: float) -> dict[str, Any]:
    """What the trace shows and in which units (``otherData`` and the process args)."""
    if timeline.time_unit == "s":
        clock = "measured seconds, shown as microseconds from the first action's start"
    else:
        clock = (
            f"simulated {timeline.time_unit} units; one unit is drawn as "
            f"{scale:g} us ({scale / 1000:g} ms), counted from the first action's start"
        )
    return {
        "schedule": timeline.schedule_name,
        "source": timeline.source,
        "num_ranks": timeline.num_ranks,
        "num_stages": timeline.num_stages,
        "num_microbatches": timeline.num_microbatches,
        "num_chunks": timeline.num_chunks,
        "time_unit": timeline.time_unit,
        "microseconds_per_unit": scale,
        "clock": clock,
        "bubble_of_step": timeline.bubble().of_step,
        "bubble_vs_ideal": timeline.bubble().vs_ideal,
    }


def _metadata(timeline: Timeline, scale: float) -> list[dict[str, Any]]:
    name = f"{timeline.schedule_name} pipeline ({timeline.source})"
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": PID, "tid": 0, "args": {"name": name}},
        {
            "name": "process_labels",
            "ph": "M",
            "pid": PID,
            "tid": 0,
            "args": {"labels": _about(timeline, scale)["clock"]},
        },
    ]
    for rank in range(timeline.num_ranks):
        events.append(
            {"name": "thread_name", "ph": "M", "pid": PID, "tid": rank,
             "args": {"name": f"rank {rank}"}}
        )  # fmt: skip
        events.append(
            {"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": rank,
             "args": {"sort_index": rank}}
        )  # fmt: skip
    return events


def _actions(timeline: Timeline, clock: _Clock) -> list[dict[str, Any]]:
    chunk_of = chunk_numbers(timeline)
    ordered = sorted(timeline.events, key=lambda e: (e.rank, e.start, e.end))
    events = []
    for event in ordered:
        ts, dur = clock.span(event)
        events.append(
            {
                "name": event.label,
                "cat": event.op.value,
                "ph": "X",
                "pid": PID,
                "tid": event.rank,
                "ts": ts,
                "dur": dur,
                "args": {
                    "stage": event.stage,
                    "microbatch": event.microbatch,
                    "op": event.op.value,
                    "chunk": chunk_of[(event.rank, event.stage)],
                },
            }
        )
    return events


def _flows(timeline: Timeline, clock: _Clock) -> list[dict[str, Any]]:
    """One arrow per transfer between ranks, from the producing action to the consuming one.

    A flow start (``s``) binds to the slice enclosing its time on the producer's rank, a flow
    end with ``"bp": "e"`` to the slice enclosing its time on the consumer's rank; both sit at
    their slice's middle so rounding cannot move them out of it.
    """
    forward = {(e.stage, e.microbatch): e for e in timeline.events if e.op is Op.F}
    gradient = {(e.stage, e.microbatch): e for e in timeline.events if e.op.is_backward}
    events: list[dict[str, Any]] = []
    for event in sorted(timeline.events, key=lambda e: (e.start, e.rank)):
        if event.op is Op.F:
            source, name = forward.get((event.stage - 1, event.microbatch)), "activation"
        elif event.op.is_backward:
            source, name = gradient.get((event.stage + 1, event.microbatch)), "gradient"
        else:
            continue
        if source is None or source.rank == event.rank:
            continue
        flow = {"name": name, "cat": "transfer", "id": len(events) // 2, "pid": PID}
        events.append({**flow, "ph": "s", "tid": source.rank, "ts": clock.middle(source)})
        events.append({**flow, "ph": "f", "bp": "e", "tid": event.rank, "ts": clock.middle(event)})
    return events


def _counters(timeline: Timeline, clock: _Clock) -> list[dict[str, Any]]:
    """Live activations of each rank over time, one counter track per rank and unit.

    Perfetto names a counter track ``"<name> <arg key>"``: "live activations rank 0 MiB".
    """
    tracks = [("stage-micro-batches", False, 1.0)]
    if timeline.activation_bytes is not None:
        tracks.append(("MiB", True, 1 / MIB))
    events: list[dict[str, Any]] = []
    for rank in range(timeline.num_ranks):
        for unit, in_bytes, factor in tracks:
            steps = collapse_steps(timeline.live_activations(rank, in_bytes=in_bytes))
            events.extend(
                {
                    "name": f"live activations rank {rank}",
                    "ph": "C",
                    "pid": PID,
                    "tid": rank,
                    "ts": clock(time),
                    "args": {unit: level * factor},
                }
                for time, level in steps
            )
    return events
