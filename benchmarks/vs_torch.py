"""stagewise vs torch.distributed.pipelining on the same tiny GPT, side by side in one run.

    .venv/bin/python benchmarks/vs_torch.py            # p=2, m=8, one thread per rank

For each schedule (GPipe, 1F1B, interleaved 1F1B) both libraries train the same model cut into
the same stages on the same batches. Step time is wall time from a barrier before the step to a
barrier after it (the same for both), median over the timed steps. Printed per schedule:
stagewise and torch step time, their ratio, efficiency = single-process step / (p x step), and
stagewise's measured step beside the simulator's prediction from stagewise's measured
per-stage costs (``stagewise.sim.simulate`` with ``Costs.per_stage`` of measured means).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stagewise.runtime import Pipeline, RankContext, launch, partition, stages_for_rank
from stagewise.runtime.measure import link_latency, measured_costs, measured_timeline
from stagewise.runtime.tiny_gpt import GPTConfig, gpt_layers, lm_loss, make_batch
from stagewise.schedules import Schedule, build
from stagewise.sim import Link, simulate

SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
}


@dataclass(frozen=True)
class Bench:
    """Sizes of one benchmark run."""

    num_ranks: int
    num_microbatches: int
    batch_size: int
    model: GPTConfig
    warmup: int
    steps: int
    schedules: tuple[str, ...]


def _batches(bench: Bench, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [make_batch(bench.model, bench.batch_size, generator) for _ in range(count)]


def _timed(fn: Any, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Barrier, step, barrier: wall seconds of one step (the same measure for both)."""
    dist.barrier()
    start = time.perf_counter()
    fn(inputs, targets)
    dist.barrier()
    return time.perf_counter() - start


def _stagewise(
    context: RankContext, schedule: Schedule, stages: list[nn.Sequential], events: list[Any]
) -> Any:
    """A step function running ``schedule`` through stagewise; appends each step's events."""
    mine = stages_for_rank(schedule, copy.deepcopy(stages), context.rank)
    pipe = Pipeline(schedule, mine, lm_loss, timeout=120, store=context.store)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        pipe.step(inputs, targets)
        for module in mine.values():
            module.zero_grad(set_to_none=True)
        events.append(list(pipe.events))

    return step


def _torch(
    context: RankContext, bench: Bench, name: str, schedule: Schedule, stages: list[nn.Sequential]
) -> Any:
    """A step function running the same schedule through torch.distributed.pipelining."""
    from torch.distributed import pipelining

    device = torch.device("cpu")
    mine = stages_for_rank(schedule, copy.deepcopy(stages), context.rank)
    torch_stages = [
        pipelining.PipelineStage(module, index, schedule.num_stages, device)
        for index, module in sorted(mine.items())
    ]
    kind = getattr(pipelining, SCHEDULES[name])
    first = schedule.num_chunks == 1
    runner = kind(torch_stages[0] if first else torch_stages, bench.num_microbatches,
                  loss_fn=lm_loss)
    holds_first = 0 in mine
    holds_last = schedule.num_stages - 1 in mine

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        args = (inputs,) if holds_first else ()
        if holds_last:
            runner.step(*args, target=targets, losses=[])
        else:
            runner.step(*args)
        for module in mine.values():
            module.zero_grad(set_to_none=True)

    return step


def bench_rank(context: RankContext, bench: Bench) -> dict[str, Any] | None:
    """Run every schedule through both libraries on this rank; rank 0 returns the results.

    The two libraries alternate step by step on the same batches, so a noisy machine slows
    both alike.
    """
    results: dict[str, Any] = {}
    layers = gpt_layers(bench.model, seed=0)
    for name in bench.schedules:
        schedule = build(name, num_ranks=bench.num_ranks, num_microbatches=bench.num_microbatches)
        stages = partition(copy.deepcopy(layers), schedule.num_stages, "params")
        events: list[Any] = []
        ours_step = _stagewise(context, schedule, stages, events)
        theirs_step = _torch(context, bench, name, schedule, stages)
        ours, theirs = [], []
        for index, (inputs, targets) in enumerate(_batches(bench, bench.warmup + bench.steps)):
            ours.append(_timed(ours_step, inputs, targets))
            theirs.append(_timed(theirs_step, inputs, targets))
            if index < bench.warmup:
                ours.pop()
                theirs.pop()
                events.pop()
        gathered: list[Any] = [None] * context.world_size
        dist.all_gather_object(gathered, events)
        results[name] = {"stagewise": ours, "torch": theirs, "events": gathered}
    if context.rank != 0:
        return None
    return results


def _single(bench: Bench) -> float:
    """Median step time of the whole model in this one process (one thread)."""
    torch.set_num_threads(1)
    model = nn.Sequential(*gpt_layers(bench.model, seed=0))
    times = []
    for index, (inputs, targets) in enumerate(_batches(bench, bench.warmup + bench.steps)):
        start = time.perf_counter()
        lm_loss(model(inputs), targets).backward()
        model.zero_grad(set_to_none=True)
        if index >= bench.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _prediction(bench: Bench, name: str, gathered: list[Any]) -> tuple[float, float, float]:
    """Median measured makespan, the simulated one from measured costs, and the link latency.

    The simulator gets stagewise's measured per-stage F/B means and the measured median
    delay a waiting rank sees after the sender finished (``link_latency``).
    """
    schedule = build(name, num_ranks=bench.num_ranks, num_microbatches=bench.num_microbatches)
    timelines = [
        measured_timeline(schedule, [e for rank_steps in gathered for e in rank_steps[i]])
        for i in range(bench.steps)
    ]
    latency = link_latency(timelines)
    predicted = simulate(schedule, measured_costs(timelines), Link(latency=latency)).makespan
    return statistics.median(t.makespan for t in timelines), predicted, latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-p", "--ranks", type=int, default=2)
    parser.add_argument("-m", "--microbatches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    args = parser.parse_args()
    bench = Bench(
        num_ranks=args.ranks,
        num_microbatches=args.microbatches,
        batch_size=args.batch_size,
        model=GPTConfig(vocab=256, seq_len=args.seq_len, dim=args.dim, heads=4,
                        layers=args.layers),
        warmup=args.warmup,
        steps=args.steps,
        schedules=tuple(args.schedules),
    )
    single = _single(bench)
    results = launch(bench_rank, bench.num_ranks, (bench,), timeout=1800, threads=1)[0]
    p = bench.num_ranks
    print(f"tiny GPT: {bench.model.layers} blocks, width {bench.model.dim}, "
          f"{bench.batch_size} x {bench.model.seq_len} tokens per step; p={p}, "
          f"m={bench.num_microbatches}, 1 thread per rank, median of {bench.steps} steps")
    print(f"single process: {single * 1e3:.1f} ms per step")
    header = (f"{'schedule':<18} {'stagewise ms':>12} {'torch ms':>9} {'ratio':>6} "
              f"{'eff sw':>7} {'eff torch':>9} {'sim ms':>7} {'sw makespan ms':>14} "
              f"{'meas/sim':>8} {'link ms':>7}")
    print(header)
    for name, result in results.items():
        ours = statistics.median(result["stagewise"])
        theirs = statistics.median(result["torch"])
        makespan, predicted, latency = _prediction(bench, name, result["events"])
        print(f"{name:<18} {ours * 1e3:>12.1f} {theirs * 1e3:>9.1f} {ours / theirs:>6.2f} "
              f"{single / (p * ours):>7.1%} {single / (p * theirs):>9.1%} "
              f"{predicted * 1e3:>7.1f} {makespan * 1e3:>14.1f} {ours / predicted:>8.2f} "
              f"{latency * 1e3:>7.2f}")
    print("ratio = stagewise / torch step time; eff = single / (p x step); sim = simulator's "
          "makespan from stagewise's measured per-stage costs and link latency (link ms); "
          "meas/sim = stagewise step / sim")


if __name__ == "__main__":
    main()
