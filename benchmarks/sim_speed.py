"""How fast the simulator is: one large pipeline end to end, and a sweep of small ones.

Run by hand:  .venv/bin/python benchmarks/sim_speed.py [--repeats 5]

"End to end" = build the schedule (generator + validation), simulate it, and read the bubble
and every rank's busy/idle/peak activations. Target: p=64, m=512, v=4 under 2 s on a 2-core
machine. Prints the median of the repeats and actions per second.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from stagewise.schedules import build
from stagewise.sim import simulate


def end_to_end(name: str, p: int, m: int, v: int) -> tuple[float, int]:
    start = time.perf_counter()
    schedule = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
    timeline = simulate(schedule)
    timeline.bubble()
    timeline.rank_stats()
    return time.perf_counter() - start, schedule.num_actions


def sweep() -> tuple[float, int, int]:
    configs = list(itertools.product(
        ["gpipe", "1f1b", "interleaved-1f1b"], [2, 4, 8, 16], [4, 8, 16, 32, 64], [1, 2, 4],
    ))
    chosen = [(n, p, m, v) for n, p, m, v in configs if n == "interleaved-1f1b" or v == 1]
    chosen = (chosen * (1000 // len(chosen) + 1))[:1000]
    start = time.perf_counter()
    actions = 0
    for n, p, m, v in chosen:
        actions += end_to_end(n, p, m, v)[1]
    return time.perf_counter() - start, len(chosen), actions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times = []
    for _ in range(args.repeats):
        seconds, actions = end_to_end("interleaved-1f1b", 64, 512, 4)
        times.append(seconds)
    median = statistics.median(times)
    print(f"p=64 m=512 v=4 interleaved-1f1b: {actions} actions, median {median:.2f} s over "
          f"{args.repeats} runs (min {min(times):.2f}, max {max(times):.2f}), "
          f"{actions / median:,.0f} actions/s, target < 2 s: {'met' if median < 2 else 'MISSED'}")
    seconds, count, actions = sweep()
    print(f"sweep of {count} configurations (gpipe, 1f1b, interleaved; p 2-16, m 4-64, v 1-4): "
          f"{seconds:.2f} s, {actions:,} actions, {actions / seconds:,.0f} actions/s")


if __name__ == "__main__":
    main()
