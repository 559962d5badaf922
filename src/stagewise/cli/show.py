"""``stagewise show``: a schedule's per-rank action grid, and its time-aligned chart."""

from __future__ import annotations

import argparse
from typing import Any

from stagewise.cli._common import add_schedule_options, schedule_from_args
from stagewise.sim import Timeline, simulate

__all__ = ["add_parser", "ascii_timeline", "run"]


def add_parser(verbs: Any) -> None:
    parser = verbs.add_parser(
        "show",
        help="print a schedule's actions per rank (and write it as CSV)",
        description=(
            "Print each rank's ordered actions (2F0 = stage 2, forward, micro-batch 0), then the "
            "same actions placed in time with forward 1 and backward 2, idle time as dots."
        ),
    )
    add_schedule_options(parser)
    parser.add_argument("--csv", metavar="OUT.csv", help="also write the schedule as CSV")
    parser.add_argument("--no-timeline", action="store_true",
                        help="print only the action grid")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    schedule = schedule_from_args(args)
    print(
        f"{schedule.name}: p={schedule.num_ranks}, m={schedule.num_microbatches}, "
        f"v={schedule.num_chunks}, stages on ranks {list(schedule.placement)}"
    )
    print(schedule.table())
    if not args.no_timeline:
        chart = ascii_timeline(simulate(schedule))
        if chart:
            print()
            print("in time (forward 1, backward 2; '.' is idle):")
            print(chart)
    if args.csv:
        schedule.save_csv(args.csv)
        print(f"wrote {args.csv}")
    return 0


def ascii_timeline(timeline: Timeline, max_width: int = 240) -> str:
    """The timeline as text, one row per rank, idle time as dots; '' when too wide to read."""
    durations = [e.duration for e in timeline.events if e.duration > 0]
    if not durations:
        return ""
    label_width = max(len(e.label) for e in timeline.events) + 1
    scale = label_width / min(durations)
    width = round(timeline.makespan * scale)
    if width > max_width:
        return ""
    lines = []
    for rank in range(timeline.num_ranks):
        row = ["."] * width
        for event in timeline.rank_events(rank):
            start = round((event.start - timeline.start) * scale)
            end = round((event.end - timeline.start) * scale)
            cell = event.label.center(end - start - 1)[: end - start - 1] + "|"
            row[start:end] = list(cell)
        lines.append(f"rank {rank:>2}: " + "".join(row))
    return "\n".join(lines)
