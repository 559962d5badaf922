"""How close the planner's step time and memory come to published Megatron-LM measurements.

Reads ``benchmarks/data/calibration_runs.json`` (Korthikanti et al. 2022 on A100-80GB), builds
each run's model and configuration, predicts its iteration time and memory with the planner's
global constants (no per-case input beyond the run's own configuration), and prints the error
of every case, the median and the worst.

The runs used Megatron-LM of 2022: unfused attention with dropout, no overlap of the data-
parallel gradient all-reduce, fp32 gradient buffers (18 bytes per parameter). Memory figures in
the file are for the transformer blocks only (Fig. 1): the activations of 'full' rows are the
no-recompute, no-sequence-parallel baseline, so those rows are predicted with that variant.

Run: ``.venv/bin/python benchmarks/planner_accuracy.py [path/to/calibration_runs.json] [--json]``
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from stagewise.plan import (
    DEFAULT_CONSTANTS,
    Cluster,
    ModelSpec,
    ParallelConfig,
    TrainingSpec,
    evaluate,
    get_gpu,
)
from stagewise.plan.memory import GIB

DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "calibration_runs.json"


def case_inputs(run: dict[str, Any]) -> tuple[ModelSpec, Cluster, TrainingSpec, ParallelConfig]:
    """The planner's inputs for one calibration entry, taken from the entry alone."""
    model = ModelSpec(
        name=run["model"],
        layers=run["layers"],
        hidden=run["hidden"],
        heads=run["heads"],
        kv_heads=run["kv_heads"] or run["heads"],
        ffn=run["ffn"],
        vocab=run["vocab"],
        mlp="gelu",
        norm="layernorm",
        tied_embeddings=True,
        position="learned",
        bias=True,
        dropout=True,
        max_seq_len=run["seq_len"],
    )
    gpu = get_gpu("A100-SXM4-80GB")
    cluster = Cluster.of_gpus(gpu, run["num_gpus"])
    training = TrainingSpec(
        seq_len=run["seq_len"],
        global_batch=run["global_batch_size"],
        attention="unfused",
        dp_overlap=False,
    )
    recompute = "full" if run["recompute"].startswith("full") else "selective"
    config = ParallelConfig.of(
        tp=run["tp"],
        pp=run["pp"],
        dp=run["dp"],
        num_chunks=run["vp"],
        micro_batch_size=run["micro_batch_size"],
        recompute=recompute,
        sequence_parallel=run["sequence_parallel"],
        schedule="interleaved-1f1b" if run["vp"] > 1 else "1f1b",
    )
    return model, cluster, training, config


def _memory_targets(measured: dict[str, float]) -> tuple[float | None, float | None]:
    states = acts = None
    for key, value in measured.items():
        if key.startswith("mem_gib_params_opt"):
            states = value
        elif key.startswith("mem_gib_activations"):
            acts = value
    return states, acts


def evaluate_case(run: dict[str, Any]) -> dict[str, Any]:
    """Predicted and measured figures of one entry, with relative errors."""
    model, cluster, training, config = case_inputs(run)
    plan = evaluate(model, cluster, training, config)
    measured = run["measured"]
    row: dict[str, Any] = {
        "id": run["id"],
        "measured_s": measured["iteration_time_s"],
        "predicted_s": plan.time.step_s,
        "mfu": plan.mfu,
    }
    row["time_error"] = row["predicted_s"] / row["measured_s"] - 1
    states, acts = _memory_targets(measured)
    if acts is not None:
        memory_config = config
        if config.recompute == "full":
            memory_config = replace(config, recompute="none", sequence_parallel=False)
        memory = evaluate(model, cluster, training, memory_config).memory
        row["states_gib"] = memory.model_states / GIB
        row["activations_gib"] = memory.activations / GIB
        row["states_error"] = row["states_gib"] / states - 1 if states else None
        row["activations_error"] = row["activations_gib"] / acts - 1
    return row


def main(argv: list[str]) -> int:
    path = Path(next((a for a in argv if not a.startswith("--")), DEFAULT_PATH))
    runs = json.loads(path.read_text())
    rows = [evaluate_case(run) for run in runs]
    if "--json" in argv:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'case':34} {'meas s':>8} {'pred s':>8} {'err':>7}  {'states':>7} {'acts':>7}")
    for row in rows:
        states = row.get("states_error")
        acts = row.get("activations_error")
        print(
            f"{row['id']:34} {row['measured_s']:8.2f} {row['predicted_s']:8.2f} "
            f"{row['time_error']:+7.1%}  "
            f"{'' if states is None else f'{states:+7.1%}':>7} "
            f"{'' if acts is None else f'{acts:+7.1%}':>7}"
        )
    constants = ", ".join(
        f"{name}={getattr(DEFAULT_CONSTANTS, name):g}"
        for name in DEFAULT_CONSTANTS.__dataclass_fields__
    )
    print(f"global constants: {constants}")
    errors = [abs(r["time_error"]) for r in rows]
    memory = [abs(r[k]) for r in rows for k in ("states_error", "activations_error")
              if r.get(k) is not None]
    print(f"step time: median |error| {statistics.median(errors):.1%}, worst {max(errors):.1%}")
    if memory:
        print(f"memory: worst |error| {max(memory):.1%} over {len(memory)} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
