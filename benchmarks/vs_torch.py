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
from stagewise.runtime.engine.measure import link_latency, measured_costs, measured_timeline
from stagewise.runtime.models.tiny_gpt import GPTConfig, gpt_layers, lm_loss, make_batch
from stagewise.schedules import Schedule, build
from stagewise.sim import Link, simulate


@dataclass(frozen=True)
class Pair:
    """A stagewise schedule and the torch schedule it is compared with.

    ``chunks`` / ``torch_chunks``: stages per rank on each side; ``exact`` says whether both
    sides run the same kind of schedule on the same stages and placement (True) or torch's is
    only the nearest equivalent (False).
    """

    ours: str
    chunks: int | None
    theirs: str
    torch_chunks: int
    exact: bool


SCHEDULES = {
    "gpipe": Pair("gpipe", None, "ScheduleGPipe", 1, True),
    "1f1b": Pair("1f1b", None, "Schedule1F1B", 1, True),
    "interleaved-1f1b": Pair("interleaved-1f1b", None, "ScheduleInterleaved1F1B", 2, True),
    # torch's interleaved zero bubble needs >= 2 looped stages per rank; zb-h1 has one, so
    # torch runs the model cut into 2p stages and stagewise into p: nearest equivalent.
    "zb-h1": Pair("zb-h1", None, "ScheduleInterleavedZeroBubble", 2, False),
    # stagewise's looped (stage = chunk*p + rank) split-backward schedule found by search, on
    # the same 2p stages as torch's; the action order is searched, not torch's: nearest.
    "auto-v2": Pair("auto", 2, "ScheduleInterleavedZeroBubble", 2, False),
    # V placement on both sides: rank r holds stages r and 2p-1-r.
    "zb-v": Pair("zb-v", None, "ScheduleZBVZeroBubble", 2, True),
    "dualpipev": Pair("dualpipev", None, "ScheduleDualPipeV", 2, True),
}
ZERO_BUBBLE = ("zb-h1", "auto-v2", "zb-v", "dualpipev")
GROUPS = {"classic": ("gpipe", "1f1b", "interleaved-1f1b"), "zb": ZERO_BUBBLE}


def _our_schedule(bench: Bench, name: str) -> Schedule:
    pair = SCHEDULES[name]
    return build(
        pair.ours,
        num_ranks=bench.num_ranks,
        num_microbatches=bench.num_microbatches,
        num_chunks=pair.chunks,
    )


def _torch_placement(name: str, num_ranks: int) -> tuple[int, ...]:
    """Stage -> rank for torch's side: looped (chunk*p + rank), or V for ZBV and DualPipeV."""
    pair = SCHEDULES[name]
    stages = num_ranks * pair.torch_chunks
    if pair.theirs in ("ScheduleZBVZeroBubble", "ScheduleDualPipeV"):
        return tuple(s if s < num_ranks else stages - 1 - s for s in range(stages))
    return tuple(s % num_ranks for s in range(stages))


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


def _torch(context: RankContext, bench: Bench, name: str, layers: list[nn.Module]) -> Any:
    """A step function running the paired schedule through torch.distributed.pipelining.

    Torch's side gets the model cut into its own number of stages, placed as torch expects
    (looped, or V for ZBV and DualPipeV), in increasing stage order per rank.
    """
    from torch.distributed import pipelining

    device = torch.device("cpu")
    pair = SCHEDULES[name]
    placement = _torch_placement(name, bench.num_ranks)
    stages = partition(copy.deepcopy(layers), len(placement), "params")
    mine = {s: stages[s] for s, r in enumerate(placement) if r == context.rank}
    torch_stages = [
        pipelining.PipelineStage(module, index, len(placement), device)
        for index, module in sorted(mine.items())
    ]
    kind = getattr(pipelining, pair.theirs)
    runner = kind(
        torch_stages[0] if pair.torch_chunks == 1 else torch_stages,
        bench.num_microbatches,
        loss_fn=lm_loss,
    )
    holds_first = 0 in mine
    holds_last = len(placement) - 1 in mine

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        args = (inputs,) if holds_first else ()
        if holds_last:
            runner.step(*args, target=targets, losses=[])
        else:
            runner.step(*args)
        for module in mine.values():
            module.zero_grad(set_to_none=True)

    return step


def _agreed_error(context: RankContext, error: BaseException | None) -> str | None:
    """The first rank's error text if any rank failed, else None (every rank agrees)."""
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, None if error is None else f"{type(error).__name__}: {error}")
    return next((e for e in gathered if e is not None), None)


def bench_rank(context: RankContext, bench: Bench) -> dict[str, Any] | None:
    """Run every schedule through both libraries on this rank; rank 0 returns the results.

    The two libraries alternate step by step on the same batches, so a noisy machine slows
    both alike. A torch schedule that fails (to build, or on its first step) is dropped and
    its reason kept; stagewise's steps then run alone.
    """
    results: dict[str, Any] = {}
    layers = gpt_layers(bench.model, seed=0)
    for name in bench.schedules:
        schedule = _our_schedule(bench, name)
        stages = partition(copy.deepcopy(layers), schedule.num_stages, "params")
        events: list[Any] = []
        ours_step = _stagewise(context, schedule, stages, events)
        theirs_step: Any = None
        error: BaseException | None = None
        try:
            theirs_step = _torch(context, bench, name, layers)
        except Exception as exc:  # any torch failure is reported, not fatal
            error = exc
        failure = _agreed_error(context, error)
        ours: list[float] = []
        theirs: list[float] = []
        for index, (inputs, targets) in enumerate(_batches(bench, bench.warmup + bench.steps)):
            ours.append(_timed(ours_step, inputs, targets))
            if failure is None:
                error = None
                try:
                    theirs.append(_timed(theirs_step, inputs, targets))
                except Exception as exc:
                    error = exc
                if index == 0:
                    failure = _agreed_error(context, error)
                elif error is not None:
                    raise error
            if index < bench.warmup:
                ours.pop()
                theirs[-1:] = []
                events.pop()
        gathered: list[Any] = [None] * context.world_size
        dist.all_gather_object(gathered, events)
        results[name] = {"stagewise": ours, "torch": theirs, "events": gathered, "failure": failure}
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

    The simulator gets stagewise's measured per-stage means (F and B, or for split-backward
    schedules F, I and W: ``measured_costs``) and the measured median delay a waiting rank
    sees after the sender finished (``link_latency``).
    """
    schedule = _our_schedule(bench, name)
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
    parser.add_argument(
        "--schedules",
        nargs="+",
        default=list(SCHEDULES),
        choices=[*SCHEDULES, *GROUPS],
        help="rows to run (groups: classic, zb = " + " ".join(ZERO_BUBBLE) + ")",
    )
    args = parser.parse_args()
    chosen = [n for a in args.schedules for n in GROUPS.get(a, (a,))]
    bench = Bench(
        num_ranks=args.ranks,
        num_microbatches=args.microbatches,
        batch_size=args.batch_size,
        model=GPTConfig(vocab=256, seq_len=args.seq_len, dim=args.dim, heads=4, layers=args.layers),
        warmup=args.warmup,
        steps=args.steps,
        schedules=tuple(dict.fromkeys(chosen)),
    )
    single = _single(bench)
    results = launch(bench_rank, bench.num_ranks, (bench,), timeout=1800, threads=1)[0]
    p = bench.num_ranks
    print(
        f"tiny GPT: {bench.model.layers} blocks, width {bench.model.dim}, "
        f"{bench.batch_size} x {bench.model.seq_len} tokens per step; p={p}, "
        f"m={bench.num_microbatches}, 1 thread per rank, median of {bench.steps} steps"
    )
    print(f"single process: {single * 1e3:.1f} ms per step")
    header = (
        f"{'schedule':<16} {'torch schedule':<29} {'match':<7} {'st sw/t':>7} "
        f"{'stagewise ms':>12} {'torch ms':>9} {'ratio':>6} {'eff sw':>7} "
        f"{'eff torch':>9} {'sim ms':>7} {'sw makespan ms':>14} {'meas/sim':>8} "
        f"{'link ms':>7}"
    )
    print(header)
    for name, result in results.items():
        pair = SCHEDULES[name]
        ours = statistics.median(result["stagewise"])
        makespan, predicted, latency = _prediction(bench, name, result["events"])
        ours_stages = _our_schedule(bench, name).num_stages
        head = (
            f"{name:<16} {pair.theirs:<29} {'exact' if pair.exact else 'nearest':<7} "
            f"{f'{ours_stages}/{p * pair.torch_chunks}':>7} {ours * 1e3:>12.1f} "
        )
        tail = (
            f"{predicted * 1e3:>7.1f} {makespan * 1e3:>14.1f} {ours / predicted:>8.2f} "
            f"{latency * 1e3:>7.2f}"
        )
        if result["failure"] is not None:
            print(f"{head}{'failed':>9} {'-':>6} {single / (p * ours):>7.1%} {'-':>9} {tail}")
            print(f"{'':<16} torch failed: {result['failure'][:300]}")
            continue
        theirs = statistics.median(result["torch"])
        print(
            f"{head}{theirs * 1e3:>9.1f} {ours / theirs:>6.2f} {single / (p * ours):>7.1%} "
            f"{single / (p * theirs):>9.1%} {tail}"
        )
    print(
        "ratio = stagewise / torch step time; eff = single / (p x step); sim = simulator's "
        "makespan from stagewise's measured per-stage costs (F, B; or F, I, W for split "
        "backward) and link latency (link ms); meas/sim = stagewise step / sim; st sw/t = "
        "stages on stagewise's / torch's side; match: exact = same kind of schedule on the "
        "same stages and placement, nearest = torch's closest schedule (see SCHEDULES)"
    )


if __name__ == "__main__":
    main()
