"""How fast the simulator is: one large pipeline end to end, and a sweep of small ones.

Run by hand:  .venv/bin/python benchmarks/sim_speed.py [--repeats 5]

"End to end" = build the schedule (generator + validation), simulate it, and read the bubble
and every rank's busy/idle/peak activations. Target: p=64, m=512, v=4 interleaved-1f1b
(262,144 actions) at 1,000,000 actions/s or more. Prints the median of the repeats, in wall
and in CPU time (CPU time is steadier on a shared machine), as actions per second, and the
same for simulate() alone on a built (so already validated) schedule.

Schedules with many ranks (``stagewise.schedules.validate.is_wide``: the target is one) are
walked by the validator round by round and timed level by level in numpy; smaller ones rank
by rank in Python. The sweep's p = 16 cases with at least 4,096 actions take the first way.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from stagewise.schedules import build
from stagewise.schedules.validate import is_wide
from stagewise.sim import simulate


def end_to_end(name: str, p: int, m: int, v: int) -> tuple[float, float, float, float, int]:
    """(wall s, CPU s, CPU s of simulate() alone, CPU s of build() alone, actions) for one
    schedule, end to end."""
    wall, cpu = time.perf_counter(), time.process_time()
    schedule = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
    before_simulate = time.process_time()
    timeline = simulate(schedule)
    simulate_cpu = time.process_time() - before_simulate
    timeline.bubble()
    timeline.rank_stats()
    return (time.perf_counter() - wall, time.process_time() - cpu, simulate_cpu,
            before_simulate - cpu, schedule.num_actions)


def sweep() -> tuple[float, int, int]:
    configs = list(itertools.product(
        ["gpipe", "1f1b", "interleaved-1f1b"], [2, 4, 8, 16], [4, 8, 16, 32, 64], [1, 2, 4],
    ))
    chosen = [(n, p, m, v) for n, p, m, v in configs if n == "interleaved-1f1b" or v == 1]
    chosen = (chosen * (1000 // len(chosen) + 1))[:1000]
    start = time.perf_counter()
    actions = 0
    for n, p, m, v in chosen:
        actions += end_to_end(n, p, m, v)[4]
    return time.perf_counter() - start, len(chosen), actions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runs = [end_to_end("interleaved-1f1b", 64, 512, 4) for _ in range(args.repeats)]
    actions = runs[0][4]
    wall, cpu, alone, built = (statistics.median(r[k] for r in runs) for k in range(4))
    print(f"p=64 m=512 v=4 interleaved-1f1b: {actions} actions end to end, median of "
          f"{args.repeats}: {wall:.2f} s wall ({actions / wall:,.0f} actions/s), {cpu:.2f} s CPU "
          f"({actions / cpu:,.0f} actions/s); target 1,000,000 actions/s: "
          f"{'met' if actions / cpu >= 1e6 else 'MISSED'}")
    print(f"  simulate() alone on the built schedule: {alone:.3f} s CPU, "
          f"{actions / alone:,.0f} actions/s")
    print(f"  build() (generator + validation) alone: {built:.3f} s CPU; the Timeline's bubble "
          f"and rank stats: {cpu - built - alone:.3f} s CPU (medians, the rest of the total)")
    wide = is_wide(build("interleaved-1f1b", num_ranks=64, num_microbatches=512, num_chunks=4))
    print(f"  validator and simulator: {'round by round, numpy' if wide else 'rank by rank'}")
    seconds, count, actions = sweep()
    print(f"sweep of {count} configurations (gpipe, 1f1b, interleaved; p 2-16, m 4-64, v 1-4): "
          f"{seconds:.2f} s, {actions:,} actions, {actions / seconds:,.0f} actions/s")


if __name__ == "__main__":
    main()
