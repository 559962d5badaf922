"""``stagewise simulate``: one schedule through the event simulator, as text, JSON or pictures."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from stagewise.cli._common import (
    add_cost_options,
    add_schedule_options,
    costs_from_args,
    link_from_args,
    planned_size,
    print_json,
    schedule_from_args,
    stage_costs_from_args,
)
from stagewise.cli._report import fmt_fraction, timeline_summary
from stagewise.errors import ConfigError
from stagewise.search import ScheduleSearchResult, search_schedule
from stagewise.sim import simulate
from stagewise.sim.limits import require_simulable

__all__ = ["add_parser", "run", "search_from_args"]


def add_parser(verbs: Any) -> None:
    parser = verbs.add_parser(
        "simulate",
        help="simulate one schedule: makespan, bubble, idle and activations per rank",
        description="Simulate one step of a schedule with the given per-stage costs.",
    )
    add_schedule_options(parser)
    add_cost_options(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", metavar="OUT.png", help="write the timeline (PNG or SVG)")
    parser.add_argument("--memory-plot", metavar="OUT.png",
                        help="write live activations over time per rank (PNG or SVG)")
    parser.add_argument("--trace", metavar="OUT.json", help="write a Chrome/Perfetto trace")
    parser.add_argument("--csv", metavar="OUT.csv", help="write the schedule as CSV")
    search = parser.add_argument_group(
        "search (-s auto)",
        "find a schedule for these costs under a per-rank activation limit; it is never worse "
        "than the best registered schedule that fits the same limit",
    )
    search.add_argument("--memory-limit", type=float, default=None,
                        help="peak live activations per rank, in stage-micro-batches")
    search.add_argument("--placement", choices=("looped", "v"), default=None,
                        help="stage placement to search (default: every one that fits v)")
    search.add_argument("--search-seconds", type=float, default=2.0,
                        help="time budget of the search (default 2)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    found = None
    if args.schedule == "auto" and not args.schedule_file:
        found = search_from_args(args)
        schedule = found.schedule
        timeline = simulate(schedule, stage_costs_from_args(
            args, schedule.num_stages, schedule.num_chunks), link_from_args(args))
    else:
        if args.memory_limit is not None:
            raise ConfigError("--memory-limit applies to the search: use it with -s auto")
        schedule = schedule_from_args(args)
        timeline = simulate(schedule, costs_from_args(args, schedule), link_from_args(args))
    summary = timeline_summary(schedule, timeline)
    if found is not None:
        summary["search"] = {
            "lower_bound": found.lower_bound,
            "gap": found.makespan / found.lower_bound - 1 if found.lower_bound else 0.0,
            "memory_limit": args.memory_limit,
        }
    written = _write_outputs(args, schedule, timeline)
    if args.json:
        summary["files"] = written
        print_json(summary)
        return 0
    print(
        f"{schedule.name}: p={schedule.num_ranks} ranks, m={schedule.num_microbatches} "
        f"micro-batches, v={schedule.num_chunks} chunk(s) per rank, "
        f"{schedule.num_stages} stages"
    )
    print(f"makespan {timeline.makespan:g}")
    if found is not None:
        print(
            f"search: lower bound (busiest rank's work) {found.lower_bound:g}, gap "
            f"{summary['search']['gap']:.2%}; found by {schedule.name!r}"
        )
    print(
        f"bubble: {fmt_fraction(summary['bubble']['of_step'])} of the step, "
        f"{fmt_fraction(summary['bubble']['vs_ideal'])} relative to ideal compute"
    )
    print(f"{'rank':>4} {'busy':>10} {'idle':>10} {'peak act.':>10}")
    for row in summary["per_rank"]:
        peak_bytes = row.get("peak_activation_bytes")
        extra = f"  ({peak_bytes:.4g} B)" if peak_bytes is not None else ""
        print(
            f"{row['rank']:>4} {row['busy']:>10.4g} {row['idle']:>10.4g} "
            f"{row['peak_activations']:>10.4g}{extra}"
        )
    for path in written:
        print(f"wrote {path}")
    return 0


def search_from_args(args: argparse.Namespace) -> ScheduleSearchResult:
    """Run the schedule search for the sizes, costs, link and limit the options give."""
    if args.ranks is None or args.microbatches is None:
        raise ConfigError("-s auto needs -p RANKS and -m MICROBATCHES")
    for label, value in (("p", args.ranks), ("m", args.microbatches), ("v", args.chunks or 1)):
        if value < 1:
            raise ConfigError(f"{label} must be a positive integer, got {value}: pass {label} >= 1")
    if args.memory_limit is not None and args.memory_limit <= 0:
        raise ConfigError(f"--memory-limit must be > 0, got {args.memory_limit}")
    require_simulable(*planned_size(args, "auto"))
    num_chunks = args.chunks or 1
    costs = stage_costs_from_args(args, args.ranks * num_chunks, num_chunks)
    return search_schedule(
        args.ranks, args.microbatches, costs, link=link_from_args(args),
        memory_limit=args.memory_limit, placement=args.placement,
        time_budget_s=args.search_seconds,
    )


def _write_outputs(args: argparse.Namespace, schedule: Any, timeline: Any) -> list[str]:
    written = []
    for option, target in (("--plot", args.plot), ("--memory-plot", args.memory_plot)):
        if target and Path(target).suffix.lower() not in (".png", ".svg"):
            raise ConfigError(f"{option} {target}: write a .png or .svg file")
    for target in (args.csv, args.plot, args.memory_plot, args.trace):
        if target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
    if args.csv:
        schedule.save_csv(args.csv)
        written.append(args.csv)
    if args.plot or args.memory_plot or args.trace:
        from stagewise import viz

        if args.plot:
            written.append(str(viz.plot_timeline(timeline, args.plot)))
        if args.memory_plot:
            in_bytes = timeline.activation_bytes is not None
            written.append(str(viz.plot_memory(timeline, args.memory_plot, in_bytes=in_bytes)))
        if args.trace:
            written.append(str(viz.write_chrome_trace(timeline, args.trace)))
    return written
