"""A run that ran fits: every published run in ``benchmarks/data`` with its published layout.

Each row of ``published_runs.json``, ``a100_runs.json`` and ``calibration_runs.json`` is read
here (rows added later are covered) and evaluated through the planner's memory model on its
own GPU with its own TP, PP, DP, micro-batch, virtual stages, recomputation, sharding,
sequence and precision. A knob the row does not state is left to the planner: the run fits
when at least one value of the unstated knobs, from the choices ``stagewise plan`` searches,
fits. Stated knobs are never relaxed. Rows the planner cannot express (context parallelism,
a TP/PP split the source does not give) are listed as skipped with the reason.

The era's defaults that the rows take for granted: Megatron-LM 2021/2022 (the A100 and
calibration files) ran unfused attention with dropout, replicated the optimizer (the
distributed optimizer came later) and, in 2021, no sequence parallelism; the NeMo and Llama 3
rows run fused (flash) attention.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stagewise.errors import PlanError
from stagewise.plan import (
    Cluster,
    ModelSpec,
    ParallelConfig,
    PipelineCache,
    TrainingSpec,
    evaluate,
    get_gpu,
    get_model,
)
from stagewise.plan.evaluate import Plan

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data"


@dataclass(frozen=True)
class Row:
    """One published run: where it comes from and the planner's view of its layout."""

    file: str
    run: dict[str, Any]
    megatron_2022: bool  # unfused attention, replicated optimizer, knobs as the paper gives

    @property
    def id(self) -> str:
        return str(self.run["id"])


def _rows() -> Iterator[Row]:
    for run in json.loads((DATA / "published_runs.json").read_text())["runs"]:
        yield Row("published_runs.json", run, megatron_2022=False)
    for run in json.loads((DATA / "a100_runs.json").read_text())["runs"]:
        yield Row("a100_runs.json", run, megatron_2022=True)
    for run in json.loads((DATA / "calibration_runs.json").read_text()):
        yield Row("calibration_runs.json", run, megatron_2022=True)


def _cannot_express(row: Row) -> str | None:
    run = row.run
    if not all(isinstance(run.get(k), int) for k in ("tp", "pp", "dp")):
        return f"{row.id}: the source does not give its TP/PP/DP split"
    if int(run.get("cp") or 1) > 1:
        return f"{row.id}: context parallelism (cp={run['cp']}) is not in the planner"
    if run.get("outcome") == "out of memory":
        return f"{row.id}: ran out of memory (planner_accuracy.py prints the planner's view)"
    layers = run.get("architecture", {}).get("layers")
    if layers is not None and run["pp"] > layers:
        return f"{row.id}: {run['pp']} stages for {layers} layers (a stage of no layer)"
    return None


def _params() -> list[Any]:
    params = []
    for row in _rows():
        reason = _cannot_express(row)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(row, id=f"{row.file}:{row.id}", marks=marks))
    return params


def _model(run: dict[str, Any]) -> ModelSpec:
    """The catalog model the row names, else the architecture the row carries."""
    arch = run.get("architecture")
    if arch is not None:
        fields = {k: v for k, v in arch.items() if k != "source"}
        return ModelSpec(name=run["id"], max_seq_len=run["seq_len"], **fields)
    if "hidden" in run:  # a Megatron GPT given by its sizes
        return ModelSpec(
            name=run["id"], layers=run["layers"], hidden=run["hidden"], heads=run["heads"],
            kv_heads=run["kv_heads"] or run["heads"], ffn=run["ffn"], vocab=run["vocab"],
            mlp="gelu", norm="layernorm", tied_embeddings=True, position="learned",
            bias=True, dropout=True, max_seq_len=run["seq_len"],
        )
    return get_model(run["model"])


def _stated(value: Any) -> bool:
    return isinstance(value, (int, bool)) or (isinstance(value, str)
                                              and not value.startswith("not stated"))


def _recompute(value: Any) -> list[str]:
    if not _stated(value):
        return ["none", "selective", "full"]
    return ["full" if str(value).startswith("full") else
            "selective" if "selective" in str(value) else "none"]


def _configs(row: Row, model: ModelSpec) -> Iterator[ParallelConfig]:
    """The published layout, with each unstated knob over the values the planner searches."""
    run = row.run
    tp, pp, dp = run["tp"], run["pp"], run["dp"]
    chunks = run.get("num_chunks", run.get("vp"))
    if isinstance(chunks, int):
        pipelines = [(chunks, "interleaved-1f1b" if chunks > 1 else "1f1b")]
    else:
        pipelines = [(1, "1f1b")] + [(v, "interleaved-1f1b") for v in (2, 4, 8)
                                     if pp > 1 and pp * v <= model.layers + 2]
    batch = run.get("micro_batch_size")
    micro = [batch] if isinstance(batch, int) else [1, 2, 4]
    if "sequence_parallel" in run:
        parallel = [bool(run["sequence_parallel"])]
    else:  # Megatron 2021 had none; NeMo and Llama 3 run it with TP
        parallel = [False] if row.file == "a100_runs.json" else [tp > 1]
    sharding = run.get("dp_sharding")
    if isinstance(sharding, str):
        shards = [sharding.split(" ")[0]]
    else:  # replicated in Megatron 2022; NeMo's recipes use the distributed optimizer
        shards = ["none"] if row.megatron_2022 else ["optimizer", "none"]
    stated_split = run.get("layer_split")
    splits = [str(stated_split).split(" ")[0]] if stated_split else ["balanced", "edges"]
    for (v, schedule), b, recompute, sp, shard, split in itertools.product(
        pipelines, micro, _recompute(run.get("recompute")), parallel, shards, splits
    ):
        yield ParallelConfig.of(
            tp=tp, pp=pp, dp=dp, num_chunks=v, schedule=schedule, micro_batch_size=b,
            recompute=recompute, sequence_parallel=sp and tp > 1,
            dp_sharding=shard if dp > 1 else "none", layer_split=split,
        )


def _plans(row: Row) -> Iterator[Plan]:
    run = row.run
    model = _model(run)
    cluster = Cluster.of_gpus(get_gpu(run["gpu"].split(" (")[0]), run["num_gpus"])
    training = TrainingSpec(
        seq_len=run["seq_len"], global_batch=int(run.get("global_batch")
                                                 or run["global_batch_size"]),
        attention=run.get("attention", "unfused" if row.megatron_2022 else "flash"),
        precision="fp8" if run["precision"] == "fp8" else "bf16",
        grad_bytes=run.get("grad_bytes", 4), engine=run.get("engine", "megatron"),
    )
    cache = PipelineCache()
    for config in _configs(row, model):
        try:
            yield evaluate(model, cluster, training, config, cache=cache)
        except PlanError:  # e.g. a micro-batch the global batch does not divide
            continue


@pytest.mark.parametrize("row", _params())
def test_a_published_run_fits_with_its_published_layout(row: Row) -> None:
    plans = list(_plans(row))
    assert plans, f"{row.id}: no configuration of its published layout could be evaluated"
    fitting = [p for p in plans if p.fits]
    closest = max(plans, key=lambda p: p.headroom_gib)
    assert fitting, (
        f"{row.id} ran, but no completion of its layout fits: closest "
        f"{closest.config.describe()}: {closest.reason}"
    )


def test_the_named_runs_of_issue_14_fit_without_recomputation() -> None:
    # Issue 14: GPT-3 175B FP8 at micro-batch 2 was said to need recomputation; Llama 3 405B
    # (TP8 PP16, 8K tokens, optimizer and gradients sharded over DP) to not fit at all. Both
    # ran without recomputation, so both must fit with recompute="none".
    wanted = {"nemo2412-gpt3-175b-512", "nemo2407-gpt3-175b-512", "llama3-405b-8192",
              "llama3-405b-16384"}
    rows = {row.id: row for row in _rows() if row.id in wanted}
    assert rows.keys() == wanted
    for row in rows.values():
        plans = [p for p in _plans(row) if p.config.recompute == "none"]
        assert any(p.fits for p in plans), (row.id, [p.reason for p in plans])
