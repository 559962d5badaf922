"""Leave-one-source-out accuracy of the planner's step time on published runs.

Sources: ``calibration_runs.json`` (Korthikanti et al. 2022) and the scored rows of
``a100_runs.json`` (Narayanan et al. 2021, Table 1); one entry's ``source_id`` (or the
calibration file) names its source. The one fitted constant is ``matmul_efficiency``: for each
held-out source it is chosen on a grid to minimise the median |error| on the other sources,
then the held-out source is predicted with it. Knobs a source does not state (micro-batch size,
virtual stages) are the planner's own choice: a search with the published TP, PP, DP and
recomputation held. Prints per source and overall: median |error|, worst |error| and mean
signed error (negative: predicted faster than measured), out of sample and in sample.

Run: ``.venv/bin/python benchmarks/planner_loso.py``
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from planner_accuracy import case_inputs

from stagewise.plan import DEFAULT_CONSTANTS, Constants, evaluate
from stagewise.plan.search import search

DATA = Path(__file__).resolve().parent / "data"
GRID = (0.60, 0.65, 0.70, 0.75, 0.80, 0.85)  # matmul_efficiency values tried


def load_runs() -> list[dict[str, Any]]:
    """Every scored run with a ``source`` key and a measured step time."""
    runs = []
    for run in json.loads((DATA / "calibration_runs.json").read_text()):
        runs.append({**run, "source_key": "korthikanti22",
                     "measured_s": run["measured"]["iteration_time_s"]})
    for run in json.loads((DATA / "a100_runs.json").read_text())["runs"]:
        if run.get("scored", True):
            runs.append({**run, "source_key": run["source_id"], "measured_s": run["step_time_s"]})
    return runs


def predict(run: dict[str, Any], constants: Constants) -> float:
    """Predicted step seconds of one run with ``constants``."""
    if run["source_key"] == "korthikanti22":
        model, cluster, training, config = case_inputs(run)
        return evaluate(model, cluster, training, config, constants).time.step_s
    base, cluster, training, _ = case_inputs({
        **run, "global_batch_size": run["global_batch"], "micro_batch_size": 1, "vp": 1,
        "recompute": "full", "sequence_parallel": False,
    })
    model = replace(base, name=run["id"])
    fixed = {"tp": run["tp"], "pp": run["pp"], "dp": run["dp"], "recompute": "full",
             "sequence_parallel": False, "dp_sharding": "none"}
    best = min(
        (search(model, cluster, training, {**fixed, "schedule": name}, constants, exact_top=1)
         .best for name in ("1f1b", "interleaved-1f1b") if name == "1f1b" or run["pp"] > 1),
        key=lambda plan: plan.time.step_s if plan else float("inf"),
    )
    return best.time.step_s if best else float("inf")


def _summary(errors: list[float]) -> str:
    if not errors:
        return "no runs"
    return (f"median |err| {statistics.median(abs(e) for e in errors):6.1%}  "
            f"worst {max(abs(e) for e in errors):6.1%}  "
            f"mean signed {statistics.fmean(errors):+6.1%}  (n={len(errors)})")


def main() -> int:
    runs = load_runs()
    sources = sorted({r["source_key"] for r in runs})
    table: dict[float, list[float]] = {}
    for value in GRID:
        constants = replace(DEFAULT_CONSTANTS, matmul_efficiency=value)
        table[value] = [predict(r, constants) / r["measured_s"] - 1 for r in runs]

    def median_on(value: float, keep: set[str]) -> float:
        return statistics.median(
            abs(e) for e, r in zip(table[value], runs, strict=True) if r["source_key"] in keep
        )

    out_of_sample: list[float] = []
    print("leave-one-source-out (matmul_efficiency fitted on the other sources):")
    for held in sources:
        others = set(sources) - {held}
        fitted = min(GRID, key=lambda v: median_on(v, others))
        errors = [e for e, r in zip(table[fitted], runs, strict=True) if r["source_key"] == held]
        out_of_sample += errors
        print(f"  {held:22} fitted {fitted:.2f}: {_summary(errors)}")
    print(f"  {'overall':22}       : {_summary(out_of_sample)}")
    everything = set(sources)
    fitted = min(GRID, key=lambda v: median_on(v, everything))
    print(f"in sample (fitted on all, {fitted:.2f}):")
    for held in sources:
        errors = [e for e, r in zip(table[fitted], runs, strict=True) if r["source_key"] == held]
        print(f"  {held:22}      {_summary(errors)}")
    print(f"  {'overall':22}      {_summary(table[fitted])}")
    default = DEFAULT_CONSTANTS.matmul_efficiency
    if default in table:
        print(f"shipped constants ({default:.2f}): {_summary(table[default])}")
    print("per run at the shipped constant:")
    for run, error in zip(runs, table.get(default, table[fitted]), strict=True):
        print(f"  {run['id']:30} measured {run['measured_s']:8.2f} s  error {error:+6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
