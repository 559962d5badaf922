"""``stagewise bubble``: the closed-form bubble beside the simulated one, and peak activations."""

from __future__ import annotations

import argparse
from typing import Any

from stagewise.cli._common import (
    add_schedule_options,
    planned_size,
    print_json,
    schedule_from_args,
)
from stagewise.cli._report import fmt_fraction
from stagewise.errors import ConfigError
from stagewise.schedules import get
from stagewise.sim import simulate
from stagewise.sim.closed_form import SUPPORTED, bubble, peak_activations
from stagewise.sim.limits import require_simulable

__all__ = ["add_parser", "run"]


def add_parser(verbs: Any) -> None:
    parser = verbs.add_parser(
        "bubble",
        help="closed-form and simulated bubble fractions and peak activations",
        description=(
            "Bubble of a schedule with uniform costs: the closed form (where one exists) beside "
            "the simulator, both as a share of the step and relative to ideal compute."
        ),
    )
    add_schedule_options(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = _skipped(args) or _simulated(args)
    if args.json:
        print_json(result)
        return 0
    print(
        f"{result['schedule']}: p={result['num_ranks']}, m={result['num_microbatches']}, "
        f"v={result['num_chunks']} (uniform costs, free communication)"
    )
    print(f"{'':14}{'of step':>10}{'vs ideal':>10}   peak activations per rank")
    for label in ("closed_form", "simulated"):
        entry = result[label]
        if entry is None and label == "closed_form":
            print(f"{'closed form':14}  (none for this schedule; the simulator is exact)")
            continue
        if entry is None:
            print(f"{'simulated':14}  (skipped: {result['skipped']})")
            continue
        peaks_text = " ".join(f"{x:g}" for x in entry["peak_activations"])
        print(
            f"{label.replace('_', ' '):14}{fmt_fraction(entry['bubble']['of_step']):>10}"
            f"{fmt_fraction(entry['bubble']['vs_ideal']):>10}   {peaks_text}"
        )
    print("peak activations are in stage-micro-batches (one micro-batch through a whole stage)")
    return 0


def _simulated(args: argparse.Namespace) -> dict[str, Any]:
    """Build and simulate the schedule; its closed form beside it where one exists."""
    schedule = schedule_from_args(args)
    timeline = simulate(schedule)
    simulated = timeline.bubble()
    peaks = [timeline.peak_activations(r) for r in range(schedule.num_ranks)]
    p, m, v = schedule.num_ranks, schedule.num_microbatches, schedule.num_chunks
    return {
        "schedule": schedule.name,
        "num_ranks": p,
        "num_microbatches": m,
        "num_chunks": v,
        "simulated": {
            "bubble": {"of_step": simulated.of_step, "vs_ideal": simulated.vs_ideal},
            "peak_activations": peaks,
        },
        "closed_form": (
            _closed_form(schedule.name, p, m, v)
            if schedule.name in SUPPORTED and not args.schedule_file else None
        ),
    }


def _skipped(args: argparse.Namespace) -> dict[str, Any] | None:
    """The closed form alone when the schedule is too large to simulate and has one.

    None when the simulator should run (or refuse with its own message): a schedule file,
    sizes not given, a size within the limit, or no closed form to fall back on.
    """
    if args.schedule_file or args.ranks is None or args.microbatches is None:
        return None
    if args.schedule not in SUPPORTED or min(args.ranks, args.microbatches) < 1:
        return None
    try:
        require_simulable(*planned_size(args))
    except ConfigError as err:
        reason = str(err)
    else:
        return None
    v = get(args.schedule).fixed_chunks or (args.chunks or get(args.schedule).default_chunks)
    return {
        "schedule": args.schedule,
        "num_ranks": args.ranks,
        "num_microbatches": args.microbatches,
        "num_chunks": v,
        "simulated": None,
        "skipped": reason,
        "closed_form": _closed_form(args.schedule, args.ranks, args.microbatches, v),
    }


def _closed_form(name: str, p: int, m: int, v: int) -> dict[str, Any]:
    closed = bubble(name, p, m, v)
    return {
        "bubble": {"of_step": closed.of_step, "vs_ideal": closed.vs_ideal},
        "peak_activations": peak_activations(name, p, m, v),
    }
