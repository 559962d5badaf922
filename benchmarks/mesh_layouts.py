"""Tokens/s of three layouts of one tiny GPT on 4 ranks, measured and predicted side by side.

    .venv/bin/python benchmarks/mesh_layouts.py            # defaults: 2 to 4 minutes
    .venv/bin/python benchmarks/mesh_layouts.py --json     # the same figures as JSON

Layouts (the same model, the same global batch, 1F1B, one torch thread per rank):
``pp=2,dp=2`` (a mesh), ``dp=4`` (a mesh with pp=1: one stage, one micro-batch per replica)
and ``pp=4`` (one pipeline). Every layout runs through the runtime itself: one ``launch`` of
4 processes calls ``stagewise.train.trainer.train_rank`` for each layout in turn, round after
round (the order rotates each round), so a noisy machine slows every layout alike. A run's
tokens/s is train_rank's own (global tokens / median step, the first step left out, each step
as long as its slowest rank saw it). The whole set of rounds is repeated to show the spread.

The prediction comes from this machine's costs, measured once before the runs, each the
fastest of ``--reps`` timings (the cost least disturbed by other load on a shared machine):

- compute, in this process with one thread: forward and backward of the embedding, one block
  and the head plus loss, at each micro-batch size a layout uses (the per-row cost differs with
  the size); a stage costs the sum of its layers (the runtime's ``params`` partition). AdamW's
  step (and ``zero_grad``) on each stage's parameters.
- communication, in a launch of 4 processes: gloo send/recv ping-pong between 2 ranks (a line
  ``latency + bytes / bandwidth`` fitted to it gives the simulator's ``Link``), and all-reduce
  of each stage's flattened gradients (and of the loss) over as many ranks as the layout has
  replicas (the other ranks wait).

Each layout's step is then (``measured_step.py`` beside this file): the pipeline from
``stagewise.sim.simulate(schedule, Costs.per_stage(...), Link(...))``; on each rank, after its
stage's last backward, the data-parallel all-reduce of that stage's gradients. With one stage
per rank and 1F1B, a stage's last backward is its rank's last action, so ``OverlappedAverage``
overlaps nothing within a rank; what it does overlap is a rank that finishes early (stage 1 in
pp=2) reducing while the other stage still computes, and the model keeps that: each rank's
reduction starts when its own last backward ends. Then the loss all-reduce (last stage, dp > 1)
and AdamW; the step is the latest rank's end.

``planner``: the planner's pipeline model (``plan.pipeline.PipelineCache``, what
``plan.steptime.step_time`` simulates) fed the same measured costs, with the same tail.
``step_time`` itself derives its costs from a GPU model (FLOPs, HBM, NVLink) and cannot take
measured seconds; its pipeline part can, and runs the same simulator on costs snapped to a 2 %
grid, so the two agree to about 1 %.

Contention: the machine may have fewer cores than ranks; two models of it, beside the
full-speed prediction:

- ``xK``: every compute cost (forward, backward, optimizer) multiplied by ``K = max(1, ranks /
  cores)``, as if every rank computed all the time with the cores shared evenly; communication
  as measured. A rank waiting for a neighbour takes no core (gloo and the runtime's mailbox
  block, they do not spin), so for a pipeline this is pessimistic.
- ``shared cores``: ``measured_step.shared_cores_step``, the same rules as an event simulation
  in which the ranks computing at each instant (of every replica) share the cores evenly.

Other programs on a shared machine take cores too. The report therefore also shows what
``train_rank`` saw inside each run (its pipeline makespan beside the simulator's from the
per-stage times of that run, and how much slower a forward plus backward ran than alone), and
a shared-cores prediction with the cores the dp=4 runs effectively got (fitted on dp=4).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from measured_step import MeasuredCosts, predict_step, shared_cores_step  # beside this file
from torch import nn

from stagewise.plan.pipeline_cache import PipelineCache
from stagewise.runconfig import (
    BatchConfig,
    LaunchConfig,
    ModelConfig,
    RunConfig,
    ScheduleConfig,
    TrainingConfig,
)
from stagewise.runtime import RankContext, launch, partition
from stagewise.runtime.engine.saved import SavedBytes
from stagewise.runtime.models.tiny_gpt import GPTConfig, gpt_layers, lm_loss, make_batch
from stagewise.runtime.parallel.mesh import Mesh
from stagewise.schedules import Schedule, build
from stagewise.sim import Link
from stagewise.train import Job, prepare, train_rank

SCHEDULE = "1f1b"
WORLD = 4
FLOAT = 4  # bytes per float32


@dataclass(frozen=True)
class Layout:
    """One way to place the model on the ranks: ``pp`` pipeline ranks times ``dp`` replicas."""

    name: str
    pp: int
    dp: int
    microbatches: int

    def rows(self, batch_size: int) -> int:
        """Sequences per micro-batch."""
        return batch_size // self.dp // self.microbatches

    def schedule(self) -> Schedule:
        return build(SCHEDULE, num_ranks=self.pp, num_microbatches=self.microbatches)


@dataclass(frozen=True)
class Bench:
    """Sizes of one benchmark run."""

    model: GPTConfig
    batch_size: int
    steps: int
    rounds: int
    repeats: int
    layouts: tuple[Layout, ...]
    reps: int
    cores: float


def _layouts(pipeline_microbatches: int, dp_microbatches: int) -> tuple[Layout, ...]:
    return (
        Layout("pp=2,dp=2", 2, 2, pipeline_microbatches),
        Layout("dp=4", 1, 4, dp_microbatches),
        Layout("pp=4", 4, 1, pipeline_microbatches),
    )


def _config(bench: Bench, layout: Layout) -> Job:
    model = bench.model
    return prepare(RunConfig(
        mesh=Mesh(pp=layout.pp, dp=layout.dp),
        schedule=ScheduleConfig(SCHEDULE, num_microbatches=layout.microbatches),
        batch=BatchConfig(global_batch=bench.batch_size, seq_len=model.seq_len),
        training=TrainingConfig(steps=bench.steps),
        model=ModelConfig(layers=model.layers, dim=model.dim, heads=model.heads),
        launch=LaunchConfig(timeout=120.0),
    ), progress=False)


# --- measured runs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """What one ``train_rank`` run of a layout reported.

    Attributes:
        tokens_per_second: global tokens / median step (first step left out).
        pipeline: median measured makespan of the pipeline part of a step (no all-reduce or
            optimizer), replica 0.
        simulated: the simulator's makespan from the per-stage costs measured in this run.
        compute: one micro-batch's forward plus backward over all stages, as timed in this
            run (mean per action).
        load: the machine's 1-minute load average when the run ended.
    """

    tokens_per_second: float
    pipeline: float
    simulated: float
    compute: float
    load: float


def layouts_rank(context: RankContext, bench: Bench) -> list[dict[str, list[Run]]] | None:
    """Every layout in turn through ``train_rank``, round after round, repeated; on rank 0
    returns per repeat ``{layout: [the run of each round]}``."""
    results: list[dict[str, list[Run]]] = []
    for repeat in range(bench.repeats):
        found: dict[str, list[Run]] = {layout.name: [] for layout in bench.layouts}
        for round_ in range(bench.rounds):
            shift = (repeat * bench.rounds + round_) % len(bench.layouts)
            for layout in bench.layouts[shift:] + bench.layouts[:shift]:
                report = train_rank(context, _config(bench, layout))
                if report is not None:
                    costs = report.stage_costs
                    found[layout.name].append(Run(
                        report.tokens_per_second, report.measured_step, report.predicted_step,
                        sum(costs["forward"]) + sum(costs["backward"]), os.getloadavg()[0],
                    ))
        results.append(found)
    return results if context.rank == 0 else None


# --- measured costs --------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCosts:
    """Seconds of one micro-batch of ``rows`` sequences: forward and backward per layer kind."""

    rows: int
    embedding: tuple[float, float]
    block: tuple[float, float]
    head: tuple[float, float]  # head plus the loss


def _fastest_seconds(reps: int, run: Callable[[], None]) -> float:
    run()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _forward_backward(
    layer: nn.Module, make_input: Callable[[], torch.Tensor],
    finish: Callable[[torch.Tensor], torch.Tensor], reps: int,
) -> tuple[float, float]:
    """Fastest forward (as the runtime runs it: counting saved bytes) and backward seconds."""
    forward, backward = [], []
    for attempt in range(reps + 1):
        x = make_input()
        start = time.perf_counter()
        with SavedBytes(layer.parameters()):
            out = finish(layer(x))
        middle = time.perf_counter()
        if out.dim() == 0:
            out.backward()
        else:
            out.backward(torch.ones_like(out))
        end = time.perf_counter()
        if attempt:
            forward.append(middle - start)
            backward.append(end - middle)
    return min(forward), min(backward)


def layer_costs(model: GPTConfig, rows: int, reps: int) -> LayerCosts:
    """Forward and backward seconds of each layer kind at ``rows`` sequences, one thread."""
    layers = gpt_layers(model, seed=0)
    embedding, block, head = layers[0], layers[1], layers[-1]
    ids, targets = make_batch(model, rows, torch.Generator().manual_seed(0))
    shape = (rows, model.seq_len, model.dim)

    def hidden() -> torch.Tensor:
        return torch.randn(shape).requires_grad_()

    def same(out: torch.Tensor) -> torch.Tensor:
        return out

    return LayerCosts(
        rows=rows,
        embedding=_forward_backward(embedding, lambda: ids, same, reps),
        block=_forward_backward(block, hidden, same, reps),
        head=_forward_backward(head, hidden, lambda out: lm_loss(out, targets), reps),
    )


def optimizer_seconds(stage: nn.Module, reps: int) -> float:
    """Fastest seconds of AdamW's step plus ``zero_grad`` on ``stage``'s parameters."""
    params = list(stage.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    times = []
    for attempt in range(reps + 1):
        for p in params:
            p.grad = torch.randn_like(p)
        start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if attempt:
            times.append(time.perf_counter() - start)
    return min(times)


def comm_rank(
    context: RankContext, p2p_bytes: Sequence[int], reduce_bytes: dict[int, list[int]], reps: int
) -> dict[str, dict[int, float]] | None:
    """Gloo costs; rank 0 returns ``{"p2p": {bytes: one-way s}, "allreduce<n>": {bytes: s}}``
    for each ``n`` of ``reduce_bytes`` (ranks 0..n-1 reduce), each the fastest of ``reps``.
    Ranks outside a measurement wait in a barrier."""
    rank = context.rank
    found: dict[str, dict[int, float]] = {"p2p": {}}
    for size in p2p_bytes:
        buffer = torch.zeros(max(1, size // FLOAT))

        def ping(buffer: torch.Tensor = buffer) -> None:
            if rank == 0:
                dist.send(buffer, 1)
                dist.recv(buffer, 1)
            else:
                dist.recv(buffer, 0)
                dist.send(buffer, 0)

        if rank < 2:
            found["p2p"][size] = _fastest_seconds(reps, ping) / 2
        dist.barrier()
    for members, sizes in sorted(reduce_bytes.items()):
        group = dist.new_group(list(range(members))) if members < context.world_size else None
        found[f"allreduce{members}"] = {}
        for size in sizes:
            flat = torch.zeros(max(1, size // FLOAT))

            def reduce(flat: torch.Tensor = flat, group: Any = group) -> None:
                dist.all_reduce(flat, group=group)

            if rank < members:
                found[f"allreduce{members}"][size] = _fastest_seconds(reps, reduce)
            dist.barrier()
    return found if rank == 0 else None


def fit_link(p2p: dict[int, float]) -> Link:
    """Least-squares ``latency + bytes / bandwidth`` through the measured one-way times."""
    sizes, times = list(p2p), list(p2p.values())
    n = len(sizes)
    mean_x, mean_y = sum(sizes) / n, sum(times) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, times, strict=True)) / sum(
        (x - mean_x) ** 2 for x in sizes
    )
    latency = max(0.0, mean_y - slope * mean_x)
    return Link(latency=latency, bandwidth=1.0 / slope if slope > 0 else None)


@dataclass(frozen=True)
class Machine:
    """This machine's measured costs (see the module docstring)."""

    layers: dict[int, LayerCosts]
    link: Link
    p2p: dict[int, float]
    allreduce: dict[str, dict[int, float]]
    stages: dict[str, MeasuredCosts]
    seconds: float


def _stages(model: GPTConfig, pp: int) -> list[nn.Sequential]:
    """The stages the runtime makes (train_rank's default ``params`` partition)."""
    return partition(gpt_layers(model, seed=0), pp, "params")


def _grad_bytes(stage: nn.Module) -> int:
    return FLOAT * sum(p.numel() for p in stage.parameters())


def measure_machine(bench: Bench) -> Machine:
    """Measure compute once in this process (one thread), communication in a 4-rank launch."""
    start = time.perf_counter()
    torch.set_num_threads(1)
    model = bench.model
    rows = sorted({layout.rows(bench.batch_size) for layout in bench.layouts})
    layers = {r: layer_costs(model, r, bench.reps) for r in rows}
    act_bytes = {r: FLOAT * r * model.seq_len * model.dim for r in rows}
    grads = {
        layout.name: [_grad_bytes(s) for s in _stages(model, layout.pp)] for layout in bench.layouts
    }
    p2p_sizes = sorted({FLOAT, *act_bytes.values(), 1 << 20, 4 << 20})
    reduce_sizes: dict[int, set[int]] = {}
    for layout in bench.layouts:
        if layout.dp > 1:
            reduce_sizes.setdefault(layout.dp, {FLOAT}).update(grads[layout.name])
    comm = launch(
        comm_rank, WORLD,
        (p2p_sizes, {n: sorted(sizes) for n, sizes in reduce_sizes.items()}, bench.reps),
        timeout=600,
    )[0]
    stages = {}
    kinds = ["embedding", *["block"] * model.layers, "head"]
    for layout in bench.layouts:
        modules = _stages(model, layout.pp)
        cost = layers[layout.rows(bench.batch_size)]
        forward, backward, start_layer = [], [], 0
        for module in modules:
            mine = [getattr(cost, kind) for kind in kinds[start_layer : start_layer + len(module)]]
            forward.append(sum(f for f, _ in mine))
            backward.append(sum(b for _, b in mine))
            start_layer += len(module)
        reduced = comm.get(f"allreduce{layout.dp}", {})
        stages[layout.name] = MeasuredCosts(
            forward=tuple(forward),
            backward=tuple(backward),
            send_bytes=tuple([float(act_bytes[cost.rows])] * (layout.pp - 1) + [0.0]),
            reduce=tuple(reduced.get(b, 0.0) for b in grads[layout.name]),
            optimizer=tuple(optimizer_seconds(m, bench.reps) for m in modules),
            loss_reduce=reduced.get(FLOAT, 0.0),
        )
    return Machine(layers, fit_link(comm["p2p"]), comm["p2p"],
                   {k: v for k, v in comm.items() if k != "p2p"}, stages,
                   time.perf_counter() - start)


# --- prediction ------------------------------------------------------------------------------


def _planner_step(layout: Layout, costs: MeasuredCosts, link: Link, factor: float) -> float:
    """The step with the planner's pipeline model (``PipelineCache``, costs on its 2 % grid)
    in place of the simulator, the same tail as :func:`predict_step` after it."""
    schedule = layout.schedule()
    compute = costs.costs(factor)
    run = PipelineCache().run(
        SCHEDULE, layout.pp, layout.microbatches, 1, compute.forward, compute.backward,
        compute.weight, [link.transfer_time(b) for b in costs.send_bytes],
    )
    # 1F1B: each stage's last backward is its rank's last action, so the rank ends with it.
    done = [run.makespan - slack for slack in run.stage_slack]
    ends = []
    for rank in range(layout.pp):
        stages = schedule.stages_of(rank)
        end = max(done[s] for s in stages) + sum(costs.reduce[s] for s in stages)
        if layout.pp - 1 in stages:
            end += costs.loss_reduce
        ends.append(end + factor * sum(costs.optimizer[s] for s in stages))
    return max(ends)


# --- report ----------------------------------------------------------------------------------


def _rows(bench: Bench, machine: Machine, measured: list[dict[str, list[Run]]]) -> list[dict[
        str, Any]]:
    tokens = bench.batch_size * bench.model.seq_len
    factor = max(1.0, WORLD / bench.cores)
    link = machine.link
    rows = []
    for layout in bench.layouts:
        costs, schedule = machine.stages[layout.name], layout.schedule()
        models = {
            "predicted": predict_step(schedule, costs, link),
            "contended": predict_step(schedule, costs, link, factor=factor),
            "shared": shared_cores_step(schedule, costs, link, bench.cores, layout.dp),
        }
        runs = [run for repeat in measured for run in repeat[layout.name]]
        row: dict[str, Any] = {
            "layout": layout.name, "pp": layout.pp, "dp": layout.dp,
            "microbatches": layout.microbatches, "rows": layout.rows(bench.batch_size),
            "measured": statistics.median(r.tokens_per_second for r in runs),
            "repeats": [statistics.median(r.tokens_per_second for r in repeat[layout.name])
                        for repeat in measured],
            "runs": [[asdict(r) for r in repeat[layout.name]] for repeat in measured],
            "in_run": {
                "step": statistics.median(tokens / r.tokens_per_second for r in runs),
                "pipeline": statistics.median(r.pipeline for r in runs),
                "simulated": statistics.median(r.simulated for r in runs),
                "slowdown": statistics.median(r.compute for r in runs) / (
                    sum(costs.forward) + sum(costs.backward)),
                "load": [min(r.load for r in runs), max(r.load for r in runs)],
            },
            "planner": tokens / _planner_step(layout, costs, link, 1.0),
            "planner_contended": tokens / _planner_step(layout, costs, link, factor),
            "costs": asdict(costs),
        }
        for name, prediction in models.items():
            row[name] = tokens / prediction.step
            row[f"{name}_step"] = {"step": prediction.step, "pipeline": prediction.pipeline,
                                   "tail": prediction.tail}
        rows.append(row)
    _calibrate(bench, machine, rows)
    return rows


def _calibrate(bench: Bench, machine: Machine, rows: list[dict[str, Any]]) -> None:
    """Add a shared-cores prediction with the cores the dp=4 runs actually got.

    In dp=4 every rank computes all the time, so its in-run slowdown s says how many cores
    the 4 ranks effectively shared, ``4 / s`` (less than the machine's when other programs
    run too). Fitted on dp=4's runs, so for dp=4 itself it is not a prediction.
    """
    dp4 = [row for row in rows if row["pp"] == 1 and row["dp"] == WORLD]
    if not dp4:
        return
    cores = min(float(bench.cores), WORLD / dp4[0]["in_run"]["slowdown"])
    tokens = bench.batch_size * bench.model.seq_len
    for layout, row in zip(bench.layouts, rows, strict=True):
        costs = machine.stages[layout.name]
        step = shared_cores_step(layout.schedule(), costs, machine.link, cores, layout.dp)
        row["calibrated"] = tokens / step.step
        row["calibrated_cores"] = cores


def _print_costs(machine: Machine) -> None:
    print(f"\nmeasured costs ({machine.seconds:.0f} s to measure):")
    for r, layer in machine.layers.items():
        print(f"- {r} rows/micro-batch, forward/backward ms: embedding "
              f"{layer.embedding[0] * 1e3:.2f}/{layer.embedding[1] * 1e3:.2f}, block "
              f"{layer.block[0] * 1e3:.2f}/{layer.block[1] * 1e3:.2f}, head+loss "
              f"{layer.head[0] * 1e3:.2f}/{layer.head[1] * 1e3:.2f}")
    for name, costs in machine.stages.items():
        print(f"- {name} stages, ms: forward "
              + " ".join(f"{x * 1e3:.1f}" for x in costs.forward) + ", backward "
              + " ".join(f"{x * 1e3:.1f}" for x in costs.backward) + ", all-reduce "
              + " ".join(f"{x * 1e3:.1f}" for x in costs.reduce) + ", AdamW "
              + " ".join(f"{x * 1e3:.1f}" for x in costs.optimizer))
    bandwidth = machine.link.bandwidth
    print(f"- gloo p2p fit: latency {machine.link.latency * 1e6:.0f} us, bandwidth "
          f"{bandwidth / 1e6 if bandwidth else float('inf'):.0f} MB/s; one-way: " + ", ".join(
              f"{b} B {t * 1e6:.0f} us" for b, t in machine.p2p.items()))
    for key, times in machine.allreduce.items():
        print(f"- {key[:-1]} over {key[-1]} ranks: " + ", ".join(
            f"{b} B {t * 1e3:.2f} ms" for b, t in times.items()))


def _print(bench: Bench, machine: Machine, rows: list[dict[str, Any]]) -> None:
    model, factor = bench.model, max(1.0, WORLD / bench.cores)
    print(
        f"tiny GPT: {model.layers} blocks, width {model.dim}, seq {model.seq_len}, vocab "
        f"{model.vocab}; {bench.batch_size} sequences per step; {SCHEDULE}; 1 thread per rank; "
        f"{WORLD} ranks on {bench.cores:g} cores (contention factor {factor:g}); {bench.steps} "
        f"steps per run (first left out), {bench.rounds} rounds x {bench.repeats} repeats"
    )
    _print_costs(machine)
    print("\ntokens/s:\n\n| layout | m | rows/mb | measured (median) | per repeat | predicted "
          f"| x{factor:g} | shared cores | meas/pred | meas/x{factor:g} | meas/shared |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        repeats = " / ".join(f"{x:,.0f}" for x in row["repeats"])
        print(f"| {row['layout']} | {row['microbatches']} | {row['rows']} | "
              f"{row['measured']:,.0f} | {repeats} | {row['predicted']:,.0f} | "
              f"{row['contended']:,.0f} | {row['shared']:,.0f} | "
              f"{row['measured'] / row['predicted']:.2f} | "
              f"{row['measured'] / row['contended']:.2f} | "
              f"{row['measured'] / row['shared']:.2f} |")
    names = [r["layout"] for r in rows]
    base = rows[names.index("dp=4")] if "dp=4" in names else rows[0]
    print(f"\ntokens/s relative to {base['layout']}:\n\n| layout | measured (per repeat) | "
          f"predicted | x{factor:g} | shared cores |")
    print("|---|---|---|---|---|")
    for row in rows:
        per = " / ".join(f"{x / y:.2f}" for x, y in zip(row["repeats"], base["repeats"],
                                                         strict=True))
        print(f"| {row['layout']} | {row['measured'] / base['measured']:.2f} ({per}) | "
              + " | ".join(f"{row[k] / base[k]:.2f}" for k in ("predicted", "contended",
                                                               "shared")) + " |")
    print("\npredicted step, ms (pipeline + tail):\n\n| layout | predicted | "
          f"x{factor:g} | shared cores | planner tok/s | planner x{factor:g} tok/s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cells = [
            f"{row[k + '_step']['pipeline'] * 1e3:.1f} + {row[k + '_step']['tail'] * 1e3:.1f}"
            for k in ("predicted", "contended", "shared")
        ]
        print(f"| {row['layout']} | " + " | ".join(cells)
              + f" | {row['planner']:,.0f} | {row['planner_contended']:,.0f} |")
    if "calibrated" in rows[0]:
        print(f"\nshared cores with the {rows[0]['calibrated_cores']:.2f} cores the dp=4 runs "
              "effectively got (4 / their in-run slowdown; fitted on dp=4):\n\n"
              "| layout | measured tok/s | predicted tok/s | measured/predicted |")
        print("|---|---|---|---|")
        for row in rows:
            print(f"| {row['layout']} | {row['measured']:,.0f} | {row['calibrated']:,.0f} | "
                  f"{row['measured'] / row['calibrated']:.2f} |")
    print("\ninside the runs (medians over runs; train_rank's own report):\n\n| layout | "
          "step ms | pipeline ms | simulated from in-run costs ms | ratio | step - pipeline ms "
          "| in-run compute / single-process | load average |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        inside = row["in_run"]
        print(f"| {row['layout']} | {inside['step'] * 1e3:.1f} | {inside['pipeline'] * 1e3:.1f} | "
              f"{inside['simulated'] * 1e3:.1f} | {inside['pipeline'] / inside['simulated']:.2f} "
              f"| {(inside['step'] - inside['pipeline']) * 1e3:.1f} | {inside['slowdown']:.2f} | "
              f"{inside['load'][0]:.1f}-{inside['load'][1]:.1f} |")
    print(
        "\nmeasured: train_rank's tokens/s, median over every round of every repeat. "
        "predicted: stagewise.sim.simulate from the measured costs, then per rank the "
        "gradient all-reduce (started at its stage's last backward), loss all-reduce and AdamW "
        f"(the tail). x{factor:g}: every compute cost x ranks/cores. shared cores: "
        "plan.measured.shared_cores_step, the ranks computing at each instant share the "
        "cores. planner: PipelineCache (the planner's pipeline model) on the same costs. "
        "Inside the runs: step = tokens / tokens/s; the pipeline part of a step (no all-reduce, "
        "no optimizer; replica 0's ranks) measured, "
        "and simulated from the forward/backward times measured in the same run; in-run compute "
        "/ single-process: how much slower a forward plus backward ran inside the run than "
        "alone (the contention actually seen); load average: the machine's, over the runs."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="global sequences per step")
    parser.add_argument("-m", "--microbatches", type=int, default=8,
                        help="micro-batches of the pipeline layouts (pp=2,dp=2 and pp=4)")
    parser.add_argument("--dp-microbatches", type=int, default=1,
                        help="micro-batches of each dp=4 replica")
    parser.add_argument("--steps", type=int, default=6, help="steps per run (first left out)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each layout per repeat")
    parser.add_argument("--repeats", type=int, default=2, help="times the rounds are repeated")
    parser.add_argument("--reps", type=int, default=20, help="timings per measured cost")
    parser.add_argument("--cores", type=float, default=len(os.sched_getaffinity(0)),
                        help="cores the ranks share (default: this process's affinity)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args()
    bench = Bench(
        model=GPTConfig(vocab=256, seq_len=args.seq_len, dim=args.dim, heads=4,
                        layers=args.layers),
        batch_size=args.batch_size, steps=args.steps, rounds=args.rounds,
        repeats=args.repeats, layouts=_layouts(args.microbatches, args.dp_microbatches),
        reps=args.reps, cores=args.cores,
    )
    for layout in bench.layouts:
        _config(bench, layout)  # bad sizes fail here, before anything runs
    machine = measure_machine(bench)
    measured = launch(layouts_rank, WORLD, (bench,), timeout=3600)[0]
    rows = _rows(bench, machine, measured)
    if args.json:
        print(json.dumps({"bench": asdict(bench), "link": asdict(machine.link),
                          "p2p": machine.p2p, "allreduce": machine.allreduce,
                          "layers": {r: asdict(c) for r, c in machine.layers.items()},
                          "layouts": rows}, indent=2))
    else:
        _print(bench, machine, rows)


if __name__ == "__main__":
    main()
