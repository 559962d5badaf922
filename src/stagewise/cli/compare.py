"""``stagewise compare``: every registered schedule side by side for the same p, m, v, costs."""

from __future__ import annotations

import argparse
from typing import Any

from stagewise.cli._common import (
    add_cost_options,
    costs_from_args,
    link_from_args,
    planned_size,
    print_json,
)
from stagewise.cli._report import fmt_fraction, timeline_summary
from stagewise.errors import ConfigError, ScheduleError
from stagewise.schedules import Schedule, build, get, names
from stagewise.sim import simulate
from stagewise.sim.limits import require_simulable

__all__ = ["add_parser", "compare", "run"]


def add_parser(verbs: Any) -> None:
    parser = verbs.add_parser(
        "compare",
        help="every registered schedule side by side",
        description="Simulate every registered schedule for the same sizes and costs.",
    )
    parser.add_argument("-p", "--ranks", type=int, required=True, help="pipeline ranks p")
    parser.add_argument("-m", "--microbatches", type=int, required=True, help="micro-batches m")
    parser.add_argument("-v", "--chunks", type=int, default=2,
                        help="chunks per rank for schedules that take any v (default 2)")
    add_cost_options(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.set_defaults(run=run)


def compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One summary per registered schedule; schedules that cannot run these sizes say why."""
    if args.ranks < 1 or args.microbatches < 1 or args.chunks < 1:
        raise ScheduleError(
            f"p, m and v must be positive integers, got p={args.ranks}, m={args.microbatches}, "
            f"v={args.chunks}"
        )
    rows = []
    for name in names():
        too_large = _too_large(args, name)
        if too_large:
            rows.append({"schedule": name, "error": too_large})
            continue
        generator = get(name)
        num_chunks = generator.fixed_chunks or args.chunks
        try:
            if name == "auto":
                schedule = _search_for(args)
            else:
                schedule = build(name, num_ranks=args.ranks,
                                 num_microbatches=args.microbatches, num_chunks=num_chunks)
        except ScheduleError as err:
            rows.append({"schedule": name, "error": str(err).splitlines()[0]})
            continue
        timeline = simulate(schedule, costs_from_args(args, schedule), link_from_args(args))
        summary = timeline_summary(schedule, timeline)
        if schedule.name != name:  # the search names what won, e.g. "auto:zb-v"
            summary["schedule"], summary["found_by"] = name, schedule.name
        rows.append(summary)
    return rows


def _too_large(args: argparse.Namespace, name: str) -> str | None:
    """Why schedule ``name`` is too large to simulate at these sizes; None when it is not."""
    try:
        require_simulable(*planned_size(args, name))
    except ConfigError as err:
        return str(err)
    return None


def _search_for(args: argparse.Namespace) -> Schedule:
    """The search on compare's own costs, with the registry's limit for auto: p units a rank."""
    from stagewise.cli.simulate import search_from_args

    options = argparse.Namespace(**vars(args))
    options.memory_limit, options.placement, options.search_seconds = args.ranks, None, 1.0
    return search_from_args(options).schedule


def run(args: argparse.Namespace) -> int:
    rows = compare(args)
    if args.json:
        print_json(rows)
        return 0
    print(f"p={args.ranks} ranks, m={args.microbatches} micro-batches; costs per whole stage: "
          f"forward {args.forward}, backward {args.backward}")
    header = (f"{'schedule':<18}{'v':>3}{'makespan':>10}{'of step':>9}{'vs ideal':>10}"
              "  peak act./rank")
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row:
            print(f"{row['schedule']:<18}  cannot run: {row['error']}")
            continue
        peaks = " ".join(f"{r['peak_activations']:g}" for r in row["per_rank"])
        print(
            f"{row['schedule']:<18}{row['num_chunks']:>3}{row['makespan']:>10.4g}"
            f"{fmt_fraction(row['bubble']['of_step']):>9}"
            f"{fmt_fraction(row['bubble']['vs_ideal']):>10}  {peaks}"
        )
    print("of step: idle share of the step; vs ideal: idle time relative to ideal compute; "
          "activations in stage-micro-batches")
    return 0
