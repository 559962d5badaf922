"""Options shared by the schedule verbs: which schedule, its sizes, and its costs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from stagewise.errors import ConfigError
from stagewise.schedules import Schedule, build, check, get, names
from stagewise.sim import Costs, Link
from stagewise.sim.limits import require_simulable

__all__ = [
    "add_cost_options",
    "add_schedule_options",
    "costs_from_args",
    "link_from_args",
    "planned_size",
    "print_json",
    "schedule_from_args",
    "stage_costs_from_args",
]


def add_schedule_options(parser: argparse.ArgumentParser, sizes_required: bool = True) -> None:
    """-s/--schedule or --schedule-file, and -p, -m, -v."""
    which = parser.add_mutually_exclusive_group(required=False)
    which.add_argument(
        "-s", "--schedule", default="1f1b",
        help=f"registered schedule name (default 1f1b): {', '.join(names())}",
    )
    which.add_argument(
        "--schedule-file", metavar="FILE.csv",
        help="a schedule as CSV, one row of actions such as 2F0 per rank",
    )
    parser.add_argument("-p", "--ranks", type=int, help="pipeline ranks p")
    parser.add_argument("-m", "--microbatches", type=int, help="micro-batches per step m")
    parser.add_argument(
        "-v", "--chunks", type=int, default=None,
        help="chunks per rank v (each chunk one virtual stage), for interleaved schedules",
    )


def schedule_from_args(args: argparse.Namespace) -> Schedule:
    """Build the schedule the options name, or load and validate the CSV file."""
    if args.schedule_file:
        schedule = Schedule.load_csv(args.schedule_file)
        require_simulable(schedule.num_actions, args.schedule_file)
        check(schedule)
        for label, given, actual in (
            ("-p", args.ranks, schedule.num_ranks),
            ("-m", args.microbatches, schedule.num_microbatches),
        ):
            if given is not None and given != actual:
                raise ConfigError(
                    f"{label} {given} disagrees with {args.schedule_file}, which has {actual}: "
                    f"drop {label} or fix the file"
                )
        return schedule
    if args.ranks is None or args.microbatches is None:
        raise ConfigError(
            f"schedule {args.schedule!r} needs its sizes: pass -p RANKS and -m MICROBATCHES "
            "(or --schedule-file FILE.csv)"
        )
    require_simulable(*planned_size(args))
    return build(
        args.schedule,
        num_ranks=args.ranks,
        num_microbatches=args.microbatches,
        num_chunks=args.chunks,
    )


def planned_size(args: argparse.Namespace, name: str | None = None) -> tuple[int, str]:
    """The most actions schedule ``name`` (default ``-s``) has for -p, -m, -v, and its label.

    Known before building, so that a schedule too large to simulate is refused at once.
    """
    generator = get(name or args.schedule)
    v = generator.fixed_chunks or (args.chunks or generator.default_chunks)
    label = f"{generator.name} with p={args.ranks}, m={args.microbatches}, v={v}"
    return generator.num_actions(args.ranks, args.microbatches, args.chunks), label


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number or a comma-separated list of numbers"
        ) from None


def add_cost_options(parser: argparse.ArgumentParser) -> None:
    """Per-stage costs and the link, for verbs that simulate."""
    group = parser.add_argument_group(
        "costs",
        "times for one micro-batch through one whole stage (a rank's share of the model); a "
        "chunk of a rank with v chunks takes 1/v. One value for every stage, or a "
        "comma-separated value per stage (more generally, per equal piece of the model in "
        "model order), e.g. --forward 1,1,1,1.5 for a heavy last quarter",
    )
    group.add_argument("--forward", type=_floats, default=[1.0], help="forward time (default 1)")
    group.add_argument("--backward", type=_floats, default=[2.0],
                       help="full backward time, input- plus weight-gradient (default 2)")
    group.add_argument("--weight", type=_floats, default=None,
                       help="weight-gradient part W of the backward (default half of it)")
    group.add_argument("--activation-bytes", type=_floats, default=None,
                       help="bytes one micro-batch keeps for backward per whole stage")
    group.add_argument("--send-bytes", type=_floats, default=None,
                       help="bytes sent across each stage boundary per micro-batch")
    group.add_argument("--latency", type=float, default=0.0,
                       help="point-to-point latency per transfer (default 0)")
    group.add_argument("--bandwidth", type=float, default=None,
                       help="point-to-point bandwidth in bytes per time unit (default infinite)")


def _per_stage(name: str, values: list[float], num_stages: int, scale: float) -> list[float]:
    n = num_stages
    if len(values) == 1:
        return [values[0] * scale] * n
    if n % len(values) == 0:
        # k values describe k consecutive, equal pieces of the model, in model order; a
        # (virtual) stage lies inside one piece, so --forward 1,1,1,1.5 means a heavy last
        # quarter (the LM head) for 4 stages and for 8 virtual stages alike.
        per_piece = n // len(values)
        return [values[s // per_piece] * scale for s in range(n)]
    raise ConfigError(
        f"--{name} has {len(values)} values but the schedule has {n} stages: give one value, "
        "one per stage, or one per equal piece of the model (a divisor of the stage count)"
    )


def costs_from_args(args: argparse.Namespace, schedule: Schedule) -> Costs:
    """The Costs the options describe, split over each rank's chunks."""
    return stage_costs_from_args(args, schedule.num_stages, schedule.num_chunks)


def stage_costs_from_args(args: argparse.Namespace, num_stages: int, num_chunks: int) -> Costs:
    """The Costs the options describe for ``num_stages`` stages, v = ``num_chunks`` per rank."""
    share = 1.0 / num_chunks
    backward = _per_stage("backward", args.backward, num_stages, share)
    weight = (
        _per_stage("weight", args.weight, num_stages, share)
        if args.weight is not None
        else [b / 2 for b in backward]
    )
    return Costs.per_stage(
        forward=_per_stage("forward", args.forward, num_stages, share),
        backward=backward,
        weight=weight,
        activation_bytes=(
            None if args.activation_bytes is None
            else _per_stage("activation-bytes", args.activation_bytes, num_stages, share)
        ),
        send_bytes=(
            None if args.send_bytes is None
            else _per_stage("send-bytes", args.send_bytes, num_stages, 1.0)
        ),
    )


def link_from_args(args: argparse.Namespace) -> Link:
    """The point-to-point Link the options describe."""
    return Link(latency=args.latency, bandwidth=args.bandwidth)


def print_json(payload: Any) -> None:
    """Print ``payload`` as indented JSON."""
    print(json.dumps(payload, indent=2))
