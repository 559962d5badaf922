"""Search every valid split of a cluster and rank the plans that fit by step time.

Valid means: TP divides the query and key/value heads and the MLP width and stays inside a
node; PP is at most the number of layers (uneven splits allowed); DP fills the rest;
micro-batches m = G / (DP x micro-batch size) is whole, with micro-batch sizes 1, 2, 4, 8;
interleaved schedules take num_chunks <= 8 per rank when the layers split evenly into PP x v
stages, or the layers + 2 do with the ``edges`` split (the embedding and the loss counted as
a layer each, Megatron-LM's account-for split: Llama 3 405B's 126 layers over 16 x 8).
Pipelines of one chunk per rank also try ``edges`` wherever it gives other stage layers than
``balanced`` (see :func:`_split_options`). Knobs
given in ``fixed`` are held (any micro-batch size, any schedule, any layer split). GPipe,
looped-bfs and ``auto`` are searched only when asked for (see ``NOT_SEARCHED``). With flash
attention, selective recomputation (of the attention core) equals no recomputation, so only
``none`` and ``full`` are searched unless ``selective`` is asked for.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from stagewise.errors import PlanError, StagewiseError
from stagewise.plan.constants import DEFAULT_CONSTANTS, Constants
from stagewise.plan.evaluate import Plan, evaluate
from stagewise.plan.hardware import Cluster
from stagewise.plan.models import ModelSpec
from stagewise.plan.pipeline_cache import PipelineCache
from stagewise.plan.spec import (
    RECOMPUTE_MODES,
    ParallelConfig,
    TrainingSpec,
    stage_layers,
    stage_slots,
)
from stagewise.schedules import get, names
from stagewise.schedules._gc import paused_gc

__all__ = ["SearchResult", "candidates", "search"]

KNOBS = (
    "tp", "pp", "dp", "num_chunks", "micro_batch_size", "recompute", "sequence_parallel",
    "dp_sharding", "schedule", "layer_split",
)
# Searched when dp > 1 and dp_sharding is not fixed: whole replicas, and Megatron's distributed
# optimizer (ZeRO-1). ZeRO-2 and FSDP are evaluated when asked for (--dp-sharding).
SEARCHED_SHARDING = ("none", "optimizer")
MICRO_BATCH_SIZES = (1, 2, 4, 8)  # searched when they divide the per-replica batch
MAX_CHUNKS = 8
# Searched only when asked for: gpipe and looped-bfs keep all m micro-batches in flight (1F1B's
# bubble, or interleaving's, with far more memory); auto runs a schedule search of its own for
# every (p, m), which costs seconds each.
NOT_SEARCHED = ("gpipe", "looped-bfs", "auto")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SearchResult:
    """Ranked plans: those that fit, fastest first, then those that do not, smallest first.

    Among the plans that fit, the first ``exact_top`` (see :func:`search`) and the best of each
    TP x PP layout are ranked exactly; the others are known to be slower and follow in order
    of their lower bound.

    Attributes:
        plans: every evaluated plan, ranked.
        skipped: (configuration, reason) for combinations that could not be built.
        seconds: wall-clock time of the search.
        simulations: distinct pipeline simulations run.
    """

    plans: list[Plan]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    simulations: int = 0

    @property
    def fitting(self) -> list[Plan]:
        return [plan for plan in self.plans if plan.fits]

    @property
    def best(self) -> Plan | None:
        fitting = self.fitting
        return fitting[0] if fitting else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _schedule_options(
    model: ModelSpec, pp: int, fixed: dict[str, Any], engine: str = "megatron"
) -> list[tuple[str, int]]:
    if pp == 1 or engine == "deepspeed":  # DeepSpeed's engine runs its 1F1B TrainSchedule
        return [(fixed.get("schedule", "1f1b"), fixed.get("num_chunks", 1))]
    wanted = [fixed["schedule"]] if "schedule" in fixed else [
        n for n in names() if n not in NOT_SEARCHED
    ]
    options: list[tuple[str, int]] = []
    for name in wanted:
        generator = get(name)
        if generator.fixed_chunks is not None:
            chunks = [generator.fixed_chunks]
        elif "num_chunks" in fixed:
            chunks = [fixed["num_chunks"]]
        else:
            chunks = [v for v in range(2, MAX_CHUNKS + 1)
                      if _even_chunks(model, pp, v, fixed.get("layer_split"))]
        options.extend(
            (name, v) for v in chunks
            if ("num_chunks" not in fixed or v == fixed["num_chunks"])
            and pp * v <= _stage_slots(model, pp, v, fixed.get("layer_split"))
        )
    return options


def _edges_divide(model: ModelSpec, pp: int, v: int) -> bool:
    """Whether the layers + embedding + loss split evenly into pp x v stages (Megatron-LM's
    account-for-embedding-and-loss split with virtual stages)."""
    return (model.layers + 2) % (pp * v) == 0


def _stage_slots(model: ModelSpec, pp: int, v: int, split: str | None) -> int:
    """:func:`stage_slots` for the split asked for; with none, for the one the search takes
    (``edges`` where it divides evenly, see :func:`_split_options`)."""
    if split is None:
        split = "edges" if _edges_divide(model, pp, v) else "balanced"
    return stage_slots(model.layers, split, v)


def _even_chunks(model: ModelSpec, pp: int, v: int, split: str | None) -> bool:
    """Whether v chunks per rank are searched: where the layers alone split evenly, or the
    layers with the embedding and the loss counted as a layer each (``edges``), unless
    ``balanced`` is asked for (an ``edges`` split asked for is evaluated at either, even
    where it is then uneven)."""
    balanced = pp * v <= model.layers and model.layers % (pp * v) == 0
    return balanced or (split != "balanced" and _edges_divide(model, pp, v))


def candidates(
    model: ModelSpec, cluster: Cluster, training: TrainingSpec, fixed: dict[str, Any] | None = None
) -> Iterator[ParallelConfig]:
    """Every valid configuration, holding the knobs in ``fixed`` (names as in ParallelConfig)."""
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(KNOBS)
    if unknown:
        raise PlanError(f"unknown knobs {sorted(unknown)}: use {', '.join(KNOBS)}")
    if "tp" in fixed:
        _check_tp(model, cluster, fixed["tp"])
    modes = _recompute_options(training, fixed)
    for tp, pp, dp in _layouts(model, cluster, training, fixed):
        yield from _layout_configs(model, training, fixed, modes, (tp, pp, dp))


def _recompute_options(training: TrainingSpec, fixed: dict[str, Any]) -> list[str]:
    """The recompute modes to try (selective recompute is moot with flash attention)."""
    if "recompute" in fixed:
        return [fixed["recompute"]]
    flash = training.attention == "flash"
    return [r for r in RECOMPUTE_MODES if not (flash and r == "selective")]


def _layouts(
    model: ModelSpec, cluster: Cluster, training: TrainingSpec, fixed: dict[str, Any]
) -> Iterator[tuple[int, int, int]]:
    """Every (tp, pp, dp) that fills the cluster, divides the global batch and keeps ``fixed``."""
    n = cluster.num_gpus
    tps = [fixed["tp"]] if "tp" in fixed else [
        t for t in _divisors(cluster.gpus_per_node)
        if model.kv_heads % t == 0 and model.heads % t == 0 and model.ffn % t == 0
    ]
    for tp in tps:
        if n % tp:
            continue
        pps = [fixed["pp"]] if "pp" in fixed else [
            p for p in _divisors(n // tp) if p <= model.layers
        ]
        for pp in pps:
            if (n // tp) % pp:
                continue
            dp = n // (tp * pp)
            if "dp" in fixed and fixed["dp"] != dp:
                continue
            if training.global_batch % dp:
                continue
            yield tp, pp, dp


def _layout_configs(
    model: ModelSpec,
    training: TrainingSpec,
    fixed: dict[str, Any],
    modes: list[str],
    layout: tuple[int, int, int],
) -> Iterator[ParallelConfig]:
    """Every configuration of one (tp, pp, dp) layout: schedule, layer split, micro-batch
    size, recompute mode, sequence parallelism and data-parallel sharding."""
    tp, pp, dp = layout
    per_replica = training.global_batch // dp
    mbss = [fixed["micro_batch_size"]] if "micro_batch_size" in fixed else [
        b for b in MICRO_BATCH_SIZES if per_replica % b == 0
    ]
    deepspeed = training.engine == "deepspeed"  # no sequence parallelism in Megatron-
    # DeepSpeed of BLOOM's time; its bf16 optimizer always shards the optimizer state
    sps = [fixed["sequence_parallel"]] if "sequence_parallel" in fixed else (
        [False, True] if tp > 1 and not deepspeed else [False]
    )
    dopts = [fixed["dp_sharding"]] if "dp_sharding" in fixed else (
        ["none"] if dp == 1 else
        ["optimizer"] if deepspeed and training.mode == "full" else list(SEARCHED_SHARDING)
    )
    for schedule, v in _schedule_options(model, pp, fixed, training.engine):
        for split in _split_options(model, pp, v, fixed):
            for mbs, recompute, sp, dopt in itertools.product(mbss, modes, sps, dopts):
                yield ParallelConfig.of(
                    tp=tp, pp=pp, dp=dp, num_chunks=v, micro_batch_size=mbs,
                    recompute=recompute, sequence_parallel=sp and tp > 1,
                    dp_sharding=dopt, schedule=schedule, layer_split=split,
                )


def _split_options(model: ModelSpec, pp: int, v: int, fixed: dict[str, Any]) -> list[str]:
    """The layer splits to try over pp x v stages: the fixed one; else, for a pipeline of one
    chunk per rank, ``balanced`` and, where it moves a layer and leaves every stage one,
    ``edges``; with virtual stages the split that makes them even: ``edges`` where the layers
    + 2 divide into pp x v stages (Megatron-LM's account-for split, ``--num-virtual-stages-
    per-pipeline-rank``; its first and last stages may then hold only the embedding and
    the loss), else ``balanced``.
    """
    if "layer_split" in fixed:
        return [fixed["layer_split"]]
    if pp == 1:
        return ["balanced"]
    if v > 1:
        return ["edges"] if _edges_divide(model, pp, v) else ["balanced"]
    try:
        balanced = stage_layers(model.layers, pp * v)
        edges = stage_layers(model.layers, pp * v, "edges")
    except PlanError:  # a stage left with no layer: evaluate says so for balanced
        return ["balanced"]
    return ["balanced"] if edges == balanced else ["balanced", "edges"]


def _check_tp(model: ModelSpec, cluster: Cluster, tp: int) -> None:
    if tp < 1 or model.heads % tp or model.kv_heads % tp or model.ffn % tp:
        raise PlanError(
            f"--tp {tp} does not divide {model.name}'s {model.heads} attention heads, "
            f"{model.kv_heads} key/value heads and MLP width {model.ffn}: choose a TP that "
            f"divides {model.kv_heads}"
        )
    if tp > cluster.gpus_per_node:
        raise PlanError(
            f"--tp {tp} spans nodes of {cluster.gpus_per_node} GPUs: keep TP <= "
            f"{cluster.gpus_per_node} (TP inside a node, PP across nodes)"
        )


def search(
    model: ModelSpec,
    cluster: Cluster,
    training: TrainingSpec,
    fixed: dict[str, Any] | None = None,
    constants: Constants = DEFAULT_CONSTANTS,
    progress: Progress | None = None,
    exact_top: int = 10,
) -> SearchResult:
    """Evaluate every candidate and rank them.

    Every plan's memory is computed. Step times need pipeline simulations, so they are
    computed in order of a cheap lower bound (the busiest rank's compute) and only while a
    plan could still enter the fastest ``exact_top`` or beat the best plan of its own TP x PP
    layout; the rest are provably slower than both and follow, ordered by their bound (their
    exact time is computed when read). So the first ``exact_top`` fitting plans and the best
    plan of every layout are exact. Python's cyclic garbage collector is paused while the
    search runs (it would walk every cached action to free nothing) and restored after.

    Args:
        model, cluster, training: what to plan.
        fixed: knobs to hold (``{"tp": 8, "pp": 1}``).
        constants: the planner's global constants.
        progress: called as ``progress(done, total)`` now and then.
        exact_top: how many of the fastest plans must be ranked exactly.

    Raises:
        PlanError: no valid configuration at all (the message says why).

    Example:
        >>> from stagewise.plan import get_gpu, get_model
        >>> result = search(get_model("llama-2-7b"), Cluster(get_gpu("h100"), 1, 8),
        ...                 TrainingSpec(seq_len=4096, global_batch=16), {"tp": 2, "pp": 2})
        >>> result.best.config.tp
        2
    """
    start = time.perf_counter()
    configs = list(candidates(model, cluster, training, fixed))
    if not configs:
        raise PlanError(_nothing_valid(model, cluster, training, fixed or {}))
    cache = PipelineCache()
    plans: list[Plan] = []
    skipped: list[tuple[str, str]] = []
    step = max(1, len(configs) // 100)
    with paused_gc():  # a search keeps its schedules' actions alive: no cycles to find
        for i, config in enumerate(configs):
            try:
                plans.append(evaluate(model, cluster, training, config, constants, cache))
            except StagewiseError as err:
                skipped.append((config.describe(), str(err)))
            if progress and (i % step == 0 or i == len(configs) - 1):
                progress(i + 1, len(configs))
        fitting = _rank_fitting([p for p in plans if p.fits], max(1, exact_top))
        cache.release_schedules()  # freed before the collector runs again: nothing to walk
    others = sorted((p for p in plans if not p.fits), key=lambda p: p.memory.total)
    return SearchResult(fitting + others, skipped, time.perf_counter() - start,
                        cache.simulations)


def _rank_fitting(plans: list[Plan], exact_top: int) -> list[Plan]:
    """Branch and bound: time plans by increasing lower bound while they can still matter."""
    fastest: list[float] = []  # max-heap (negated) of the exact_top best step times so far
    layout_best: dict[tuple[int, int], float] = {}
    timed: list[Plan] = []
    untimed: list[Plan] = []
    for plan in sorted(plans, key=lambda p: p.lower_bound_s):
        bound = plan.lower_bound_s
        layout = (plan.config.tp, plan.config.pp)
        kth = -fastest[0] if len(fastest) >= exact_top else math.inf
        if bound >= kth and bound >= layout_best.get(layout, math.inf):
            untimed.append(plan)
            continue
        step = plan.time.step_s
        timed.append(plan)
        layout_best[layout] = min(step, layout_best.get(layout, math.inf))
        heapq.heappush(fastest, -step)
        if len(fastest) > exact_top:
            heapq.heappop(fastest)
    timed.sort(key=lambda p: p.time.step_s)
    return timed + untimed


def _nothing_valid(
    model: ModelSpec, cluster: Cluster, training: TrainingSpec, fixed: dict[str, Any]
) -> str:
    """Why no configuration holds ``fixed``: the first held knob that rules every layout out."""
    n = cluster.num_gpus
    tp, pp, dp = fixed.get("tp"), fixed.get("pp"), fixed.get("dp")
    if tp is not None and n % tp:
        return f"TP={tp} does not divide the {n} GPUs: choose a TP that divides {n}"
    if tp is not None and pp is not None and (n % (tp * pp)):
        return f"tp x pp = {tp} x {pp} does not divide the {n} GPUs: change --tp or --pp"
    if pp is not None and pp > model.layers:
        return f"PP={pp} exceeds {model.name}'s {model.layers} layers: lower --pp"
    chunks = fixed.get("num_chunks")
    if pp is not None and chunks is not None and pp * chunks > _stage_slots(
            model, pp, chunks, fixed.get("layer_split")):
        edges = fixed.get("layer_split") == "edges" and chunks > 1
        limit = (model.layers + 2) // pp if edges else model.layers // pp
        what = f"{model.layers} layers" + (" + the embedding and the loss" if edges else "")
        hint = "" if edges or fixed.get("layer_split") == "balanced" else (
            f", or to {(model.layers + 2) // pp} with layer_split='edges' (the embedding and "
            "the loss a chunk each)")
        return (f"pp x num_chunks = {pp} x {chunks} = {pp * chunks} exceeds {model.name}'s "
                f"{what}: lower num_chunks to at most {limit}{hint}")
    if tp is not None and pp is not None and dp is not None and tp * pp * dp != n:
        return (f"tp x pp x dp = {tp} x {pp} x {dp} = {tp * pp * dp} but the cluster has {n} "
                f"GPUs: make the product equal {n}")
    if dp is not None and training.global_batch % dp:
        return (f"DP={dp} does not divide the global batch {training.global_batch}: change "
                "--global-batch or DP")
    return (
        f"no configuration of {n} GPUs fits the constraints for global batch "
        f"{training.global_batch} with {fixed or 'no fixed knobs'}: the data-parallel size "
        f"must divide the global batch, TP must divide {model.kv_heads} key/value heads and "
        "pp x num_chunks must not exceed the layers; change --global-batch or the fixed knobs"
    )
