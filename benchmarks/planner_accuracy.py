"""How close the planner's step time comes to published runs it was not fitted to.

Leave-one-source-out over every scored run in ``benchmarks/data`` (``planner_runs.py`` turns
each row into planner inputs). Two constants are fitted, each on a grid, on the sources that
are NOT held out: ``matmul_efficiency`` on all their runs (minimising the median |error|), then
``fp8_efficiency`` on their FP8 runs (the shipped value when they have none). The held-out
source is predicted with those; every other constant is physical and never fitted. Printed per
source and overall: median |error|, worst |error| and mean signed error (negative: predicted
faster than published), out of sample and in sample; then every run, and the memory check
against Korthikanti et al.'s Fig. 1 (transformer blocks only: the 'full' rows' figures are the
no-recompute, no-sequence-parallel baseline, so those rows are sized with that variant).

Run: ``.venv/bin/python benchmarks/planner_accuracy.py [--json]``
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from planner_runs import DATA, Case, calibration_inputs, load_cases

from stagewise.plan import DEFAULT_CONSTANTS, Constants, evaluate
from stagewise.plan.memory import GIB

MATMUL_GRID = (0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90)
FP8_GRID = (0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85)
Key = tuple[float, float]


def error_table(cases: list[Case]) -> dict[Key, list[float]]:
    """Signed relative error of every case for every (matmul, fp8) pair of the grids.

    BF16 runs do not depend on ``fp8_efficiency``, so they are predicted once per matmul
    value and shared across the FP8 grid.
    """
    table: dict[Key, list[float]] = {}
    for me in MATMUL_GRID:
        bf16: dict[str, float] = {}
        for fe in FP8_GRID:
            c = replace(DEFAULT_CONSTANTS, matmul_efficiency=me, fp8_efficiency=fe)
            row = []
            for case in cases:
                if case.precision != "fp8" and case.id in bf16:
                    row.append(bf16[case.id])
                    continue
                error = case.predict(c) / case.measured_s - 1
                if case.precision != "fp8":
                    bf16[case.id] = error
                row.append(error)
            table[(me, fe)] = row
    return table


def _median_abs(errors: list[float]) -> float:
    return statistics.median(abs(e) for e in errors) if errors else 0.0


def fit(cases: list[Case], table: dict[Key, list[float]], keep: set[str]) -> Key:
    """(matmul, fp8) efficiencies fitted on the runs of the sources in ``keep``."""
    default_fp8 = DEFAULT_CONSTANTS.fp8_efficiency

    def errors(key: Key, fp8: bool | None) -> list[float]:
        return [e for e, c in zip(table[key], cases, strict=True) if c.source in keep
                and (fp8 is None or (c.precision == "fp8") == fp8)]

    me = min(MATMUL_GRID, key=lambda v: _median_abs(errors((v, default_fp8), False)))
    if not errors((me, default_fp8), True):
        return me, default_fp8
    fe = min(FP8_GRID, key=lambda v: _median_abs(errors((me, v), True)))
    return me, fe


def summary(errors: list[float]) -> dict[str, float]:
    """Median and worst |error| and mean signed error."""
    return {"n": len(errors), "median": _median_abs(errors),
            "worst": max(abs(e) for e in errors), "mean_signed": statistics.fmean(errors)}


def leave_one_source_out(cases: list[Case]) -> dict[str, Any]:
    """Per held-out source: the fitted pair and its errors; overall; and in sample."""
    table = error_table(cases)
    sources = sorted({c.source for c in cases})
    result: dict[str, Any] = {"sources": {}, "runs": {}}
    pooled: list[float] = []
    for held in sources:
        key = fit(cases, table, set(sources) - {held})
        errors = [e for e, c in zip(table[key], cases, strict=True) if c.source == held]
        pooled += errors
        result["sources"][held] = {"fitted": key, **summary(errors)}
        for e, c in zip(table[key], cases, strict=True):
            if c.source == held:
                result["runs"][c.id] = {"source": c.source, "measured_s": c.measured_s,
                                        "error": e, "gpu": c.gpu, "precision": c.precision}
    result["overall"] = summary(pooled)
    key = fit(cases, table, set(sources))
    result["in_sample"] = {"fitted": key, **summary(table[key]), "sources": {
        s: summary([e for e, c in zip(table[key], cases, strict=True) if c.source == s])
        for s in sources}}
    return result


def memory_check(path: Path = DATA / "calibration_runs.json") -> list[dict[str, Any]]:
    """Predicted model states and activations against Korthikanti et al.'s Fig. 1."""
    rows = []
    for run in json.loads(path.read_text()):
        states = acts = None
        for key, value in run["measured"].items():
            if key.startswith("mem_gib_params_opt"):
                states = value
            elif key.startswith("mem_gib_activations"):
                acts = value
        if acts is None:
            continue
        model, cluster, training, config = calibration_inputs(run)
        if config.recompute == "full":
            config = replace(config, recompute="none", sequence_parallel=False)
        memory = evaluate(model, cluster, training, config).memory
        rows.append({"id": run["id"],
                     "states_error": memory.model_states / GIB / states - 1 if states else None,
                     "activations_error": memory.activations / GIB / acts - 1})
    return rows


def _line(label: str, s: dict[str, Any]) -> str:
    fitted = s.get("fitted")
    pair = f"fitted {fitted[0]:.2f}/{fitted[1]:.2f}  " if fitted else " " * 19
    return (f"  {label:22} {pair}median {s['median']:6.1%}  worst {s['worst']:6.1%}  "
            f"mean signed {s['mean_signed']:+6.1%}  (n={s['n']})")


def main(argv: list[str]) -> int:
    result = leave_one_source_out(load_cases())
    result["memory"] = memory_check()
    if "--json" in argv:
        print(json.dumps(result, indent=1))
        return 0
    print("leave-one-source-out (matmul/fp8 efficiency fitted on the other sources):")
    for source, s in result["sources"].items():
        print(_line(source, s))
    print(_line("overall", result["overall"]))
    inside = result["in_sample"]
    print(f"in sample (fitted on all: {inside['fitted'][0]:.2f}/{inside['fitted'][1]:.2f}):")
    for source, s in inside["sources"].items():
        print(_line(source, s))
    print(_line("overall", inside))
    print("every run, out of sample:")
    for run_id, r in result["runs"].items():
        print(f"  {run_id:34} {r['gpu']:5} {r['precision']:5} measured {r['measured_s']:8.2f} s"
              f"  error {r['error']:+6.1%}")
    memory = [abs(r[k]) for r in result["memory"] for k in ("states_error", "activations_error")
              if r.get(k) is not None]
    print(f"memory (Korthikanti Fig. 1): worst |error| {max(memory):.1%} over {len(memory)} "
          "figures")
    constants = ", ".join(f"{name}={getattr(DEFAULT_CONSTANTS, name):g}"
                          for name in Constants.__dataclass_fields__)
    print(f"shipped constants: {constants}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
