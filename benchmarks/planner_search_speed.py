"""Wall-clock time of full planner searches, the largest being Llama-3-405B on 16,384 H100s.

Each case runs :func:`stagewise.plan.search.search` over every valid configuration (no knob
fixed) and prints the number of configurations, how many fit, the distinct pipeline
simulations run, the median wall-clock and CPU seconds over ``--repeat`` searches (each with
a fresh cache; on a shared machine the CPU time is the steadier figure), a digest of the
result and the best plan. The digest covers the order of every ranked plan, each plan's
memory and verdict, and the exact figures of the fastest ten and of each layout's best: two
versions of the planner that print the same digest ranked the same. Target (issue 14): every
case under 2 s.

Run: ``.venv/bin/python benchmarks/planner_search_speed.py [--repeat 5]``
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time

from stagewise.plan import Cluster, TrainingSpec, get_gpu, get_model
from stagewise.plan.search import SearchResult, search

CASES = (
    # model, GPUs, seq, global batch
    ("llama-2-70b", 32, 4096, 64),
    ("llama-3-70b", 512, 8192, 512),
    ("gpt-3-175b", 1024, 2048, 1536),
    ("llama-3-405b", 16384, 8192, 2048),
)


def digest(result: SearchResult) -> str:
    """Eight hex digits of what a search decided (see the module docstring); reads only the
    step times the search computed exactly."""
    lines = [f"{p.config.describe()} {p.fits} {p.memory!r}" for p in result.plans]
    lines += [f"{p.config.describe()} {p.time!r}" for p in result.fitting[:10]]
    layouts: dict[tuple[int, int], str] = {}
    for plan in result.fitting:  # the first of each layout is its best
        layout = (plan.config.tp, plan.config.pp)
        if layout not in layouts:
            layouts[layout] = f"{plan.time!r}"
    lines += [f"{layout} {time}" for layout, time in sorted(layouts.items())]
    lines += [f"{config} {reason}" for config, reason in result.skipped]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:8]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="searches per case (median)")
    repeat = max(1, parser.parse_args(argv).repeat)
    gpu = get_gpu("H100")
    print(f"{'model':14} {'GPUs':>6} {'configs':>8} {'fit':>6} {'sims':>5} {'seconds':>8} "
          f"{'cpu s':>6} {'digest':>8}  best")
    worst = 0.0
    for name, gpus, seq, batch in CASES:
        runs, cpu = [], []
        for _ in range(repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            result = search(get_model(name), Cluster.of_gpus(gpu, gpus), TrainingSpec(seq, batch))
            runs.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        seconds = statistics.median(runs)
        worst = max(worst, seconds)
        best = result.best
        summary = (
            f"{best.config.describe()}: {best.time.step_s:.2f} s/step, MFU {best.mfu:.1%}"
            if best else "nothing fits"
        )
        print(
            f"{name:14} {gpus:>6} {len(result.plans):>8} {len(result.fitting):>6} "
            f"{result.simulations:>5} {seconds:>8.2f} {statistics.median(cpu):>6.2f} "
            f"{digest(result):>8}  {summary}"
        )
    print(f"slowest search (median of {repeat}): {worst:.2f} s (target: every case under 2 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
