"""``stagewise bubble``: the closed-form bubble beside the simulated one, and peak activations."""

from __future__ import annotations

import argparse
from typing import Any

from stagewise.cli._common import add_schedule_options, print_json, schedule_from_args
from stagewise.cli._report import fmt_fraction
from stagewise.sim import simulate
from stagewise.sim.closed_form import SUPPORTED, bubble, peak_activations

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
    schedule = schedule_from_args(args)
    timeline = simulate(schedule)
    simulated = timeline.bubble()
    peaks = [timeline.peak_activations(r) for r in range(schedule.num_ranks)]
    result: dict[str, Any] = {
        "schedule": schedule.name,
        "num_ranks": schedule.num_ranks,
        "num_microbatches": schedule.num_microbatches,
        "num_chunks": schedule.num_chunks,
        "simulated": {
            "bubble": {"of_step": simulated.of_step, "vs_ideal": simulated.vs_ideal},
            "peak_activations": peaks,
        },
        "closed_form": None,
    }
    if schedule.name in SUPPORTED and not args.schedule_file:
        p, m, v = schedule.num_ranks, schedule.num_microbatches, schedule.num_chunks
        closed = bubble(schedule.name, p, m, v)
        result["closed_form"] = {
            "bubble": {"of_step": closed.of_step, "vs_ideal": closed.vs_ideal},
            "peak_activations": peak_activations(schedule.name, p, m, v),
        }
    if args.json:
        print_json(result)
        return 0
    print(
        f"{schedule.name}: p={schedule.num_ranks}, m={schedule.num_microbatches}, "
        f"v={schedule.num_chunks} (uniform costs, free communication)"
    )
    print(f"{'':14}{'of step':>10}{'vs ideal':>10}   peak activations per rank")
    for label in ("closed_form", "simulated"):
        entry = result[label]
        if entry is None:
            print(f"{'closed form':14}  (none for this schedule; the simulator is exact)")
            continue
        peaks_text = " ".join(f"{x:g}" for x in entry["peak_activations"])
        print(
            f"{label.replace('_', ' '):14}{fmt_fraction(entry['bubble']['of_step']):>10}"
            f"{fmt_fraction(entry['bubble']['vs_ideal']):>10}   {peaks_text}"
        )
    print("peak activations are in stage-micro-batches (one micro-batch through a whole stage)")
    return 0
