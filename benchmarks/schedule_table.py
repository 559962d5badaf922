"""Every registered schedule's bubble and peak memory, from the simulator (issue 5, item 5).

For p = 4 and 8 ranks and m = 8, 16, 32 micro-batches, with F = I = W = 1 per full rank share
(B = I + W = 2 for the schedules that do not split the backward), and again with the last stage
1.5x heavier (an LM head, say). Each schedule runs with its default chunks per rank (v = 2 for
interleaved-1f1b, looped-bfs, zb-v and dualpipev), so every row does the same total work.

Two more rows per table run ``search_schedule`` on the table's own costs (so also the heavy
last stage) with a memory limit of p units (1F1B's peak), on one and on two chunks per rank.

Columns: makespan; bubble as idle share of the step and relative to ideal compute (both
definitions, DESIGN.md); the lower bound (largest per-rank busy time) and the gap to it; the
fill bound (busy time plus the wait for the first forward, stagewise.search.fill_bound); the
peak live activations over ranks in stage-micro-batch units. Run:

    .venv/bin/python benchmarks/schedule_table.py            # the full table (markdown)
    .venv/bin/python benchmarks/schedule_table.py -p 4 -m 8  # one size
"""

from __future__ import annotations

import argparse
import time

from stagewise.errors import StagewiseError
from stagewise.schedules import build, get, names
from stagewise.search import fill_bound, lower_bound, search_schedule
from stagewise.sim import Costs, simulate


def stage_costs(num_ranks: int, num_chunks: int, last_factor: float) -> Costs:
    """F = I = W = 1 per rank share, split over chunks; the last stage scaled by last_factor."""
    n = num_ranks * num_chunks
    scale = [1.0] * (n - 1) + [last_factor]
    return Costs.per_stage(
        [1.0 / num_chunks * x for x in scale],
        [2.0 / num_chunks * x for x in scale],
        [1.0 / num_chunks * x for x in scale],
    )


def row(name: str, p: int, m: int, last_factor: float) -> str:
    v = get(name).default_chunks
    try:
        schedule = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
    except StagewiseError as err:
        reason = str(err).split(":")[1].strip() if ":" in str(err) else str(err)
        return f"| {name} | {v} | n/a: {reason[:60]} | | | | | | |"
    costs = stage_costs(p, schedule.num_chunks, last_factor)
    timeline = simulate(schedule, costs)
    bubble = timeline.bubble()
    bound = lower_bound(schedule.placement, m, costs)
    fill = fill_bound(schedule.placement, m, costs)
    peak = max(timeline.peak_activations(r) for r in range(p))
    label = name if schedule.name in (name, "auto") else f"{name} ({schedule.name})"
    return (
        f"| {label} | {schedule.num_chunks} | {timeline.makespan:.2f} | {bubble.of_step:.1%} | "
        f"{bubble.vs_ideal:.1%} | {bound:.2f} | {timeline.makespan / bound - 1:.1%} | "
        f"{fill:.2f} | {peak:.2f} |"
    )


def search_row(p: int, m: int, v: int, last_factor: float) -> str:
    """search_schedule with the table's own costs, within 1F1B's memory (p units)."""
    costs = stage_costs(p, v, last_factor)
    found = search_schedule(p, m, costs, memory_limit=p, max_variants=10, max_moves=400)
    timeline = simulate(found.schedule, costs)
    bubble = timeline.bubble()
    peak = max(timeline.peak_activations(r) for r in range(p))
    kind = "V" if found.schedule.placement[p:] == tuple(reversed(range(p))) and v == 2 else (
        "looped")
    return (
        f"| search, mem <= {p} ({found.schedule.name}, {kind}) | {v} | {found.makespan:.2f} | "
        f"{bubble.of_step:.1%} | {bubble.vs_ideal:.1%} | {found.lower_bound:.2f} | "
        f"{found.makespan / found.lower_bound - 1:.1%} | "
        f"{fill_bound(found.schedule.placement, m, costs):.2f} | {peak:.2f} |"
    )


def table(p: int, m: int, last_factor: float) -> str:
    title = "F=I=W=1" if last_factor == 1.0 else f"F=I=W=1, last stage x{last_factor}"
    lines = [
        f"### p={p}, m={m}, {title}",
        "",
        "| schedule | v | makespan | bubble (of step) | bubble (vs ideal) | lower bound | "
        "gap | fill bound | peak act. (units) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    # "auto" is the registry's search for uniform costs; the search rows use these costs
    lines += [row(name, p, m, last_factor) for name in names() if name != "auto"]
    lines += [search_row(p, m, v, last_factor) for v in (1, 2)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-p", "--ranks", type=int, nargs="*", default=[4, 8])
    parser.add_argument("-m", "--microbatches", type=int, nargs="*", default=[8, 16, 32])
    parser.add_argument("--heavy-last", type=float, default=1.5,
                        help="factor on the last stage's costs for the second table")
    args = parser.parse_args()
    start = time.perf_counter()
    for last_factor in (1.0, args.heavy_last):
        for p in args.ranks:
            for m in args.microbatches:
                print(table(p, m, last_factor), end="\n\n")
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
