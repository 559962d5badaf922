"""How close the planner's step time comes to published runs it was not fitted to.

Leave-one-source-out over every scored run in ``benchmarks/data`` (``planner_runs.py`` turns
each row into planner inputs). Two constants are fitted, each on a grid of 0.02 steps, on the
sources that are NOT held out: ``matmul_efficiency`` (the share of each GPU's measured GEMM rate
sustained in training) on their BF16 runs (the value whose median signed error, every source
weighing the same, is nearest zero: a scale on time, calibrated to leave its runs unbiased), then
``fp8_efficiency`` on their FP8 runs, each measured against its own source's BF16 level where
that source also publishes BF16 runs (``fp8_relative_errors``), ``FP8_PRIOR``, 1.0, when they
have none (whatever the shipped value is). The held-out
source is predicted with those; every other constant is physical and never fitted. Printed per
source and overall: median |error|, worst |error| and mean signed error (negative: predicted
faster than published), out of sample and in sample; then every run, the rows kept out of the
score but predicted for the record (``reference`` in the data), and the memory check
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

from planner_runs import (
    DATA,
    Case,
    calibration_inputs,
    load_cases,
    published_inputs,
    reference_cases,
)

from stagewise.plan import DEFAULT_CONSTANTS, Constants, evaluate, search
from stagewise.plan.memory import GIB

FP8_PRIOR = 1.0
"""fp8_efficiency where the fitting sources hold no FP8 run: an FP8 GEMM sustains the same share
of its sustained rate as a BF16 one. The shipped value is the fit on every source (1.04); the
held-out fits never read it."""
MATMUL_GRID = tuple(round(0.70 + 0.02 * i, 2) for i in range(16))  # 0.70 ... 1.00, at most measured
FP8_GRID = tuple(round(0.80 + 0.02 * i, 2) for i in range(16))  # 0.80 ... 1.10
Key = tuple[float, float]


class Errors:
    """Signed relative error of each case under (matmul, fp8) efficiencies, computed once.

    BF16 runs do not depend on ``fp8_efficiency``, so one prediction serves every FP8 value.
    """

    def __init__(self, cases: list[Case]) -> None:
        self.cases = cases
        self._memo: dict[tuple[str, float, float], float] = {}

    def of(self, case: Case, key: Key) -> float:
        fp8 = key[1] if case.precision == "fp8" else FP8_PRIOR
        memo_key = (case.id, key[0], fp8)
        if memo_key not in self._memo:
            c = replace(DEFAULT_CONSTANTS, matmul_efficiency=key[0], fp8_efficiency=fp8)
            self._memo[memo_key] = case.predict(c) / case.measured_s - 1
        return self._memo[memo_key]

    def select(self, key: Key, keep: set[str], fp8: bool | None = None) -> list[float]:
        """Errors at ``key`` of the runs of the sources in ``keep`` (only FP8 or BF16 ones)."""
        return [self.of(c, key) for c in self.cases if c.source in keep
                and (fp8 is None or (c.precision == "fp8") == fp8)]


def _median_abs(errors: list[float]) -> float:
    return statistics.median(abs(e) for e in errors) if errors else 0.0


def fp8_relative_errors(errors: Errors, key: Key, keep: set[str]) -> list[float]:
    """Errors at ``key`` of the FP8 runs of the sources in ``keep``, each against its own
    source's BF16 level: (1 + error) / (1 + that source's median signed BF16 error) - 1.

    ``fp8_efficiency`` is FP8's share relative to BF16's, so a source that also publishes
    BF16 runs fits it on how much faster its FP8 runs are than its BF16 ones, not on how
    far its whole stack is from the planner (that level is ``matmul_efficiency``'s, fitted
    on the BF16 runs of every source); a source with FP8 runs only is taken as it is.
    """
    relative = []
    for source in sorted(keep):
        fp8 = errors.select(key, {source}, True)
        bf16 = errors.select(key, {source}, False)
        level = statistics.median(bf16) if bf16 else 0.0
        relative += [(1 + e) / (1 + level) - 1 for e in fp8]
    return relative


def weighted_median(values: list[float], weights: list[float]) -> float:
    """The value below and above which half the total weight lies (the lower one on a tie)."""
    pairs = sorted(zip(values, weights, strict=True))
    half, running = sum(weights) / 2, 0.0
    for value, weight in pairs:
        running += weight
        if running >= half:
            return value
    return pairs[-1][0]


def _weighted_bias(groups: list[list[float]]) -> float:
    """|weighted median| of the signed errors of several sources, each source weighing as much
    as any other (a run weighs 1 / its source's runs): a source of 61 runs does not outvote
    one of 2. Empty groups are left out."""
    values: list[float] = []
    weights: list[float] = []
    for own in (group for group in groups if group):
        values += own
        weights += [1.0 / len(own)] * len(own)
    return abs(weighted_median(values, weights)) if values else 0.0


def _source_bias(errors: Errors, key: Key, keep: set[str]) -> float:
    """:func:`_weighted_bias` of the BF16 runs of the sources in ``keep``."""
    return _weighted_bias([errors.select(key, {s}, False) for s in sorted(keep)])


def _fp8_bias(errors: Errors, key: Key, keep: set[str]) -> float:
    """:func:`_weighted_bias` of the FP8 runs of the sources in ``keep``, each against its own
    source's BF16 level (:func:`fp8_relative_errors`)."""
    return _weighted_bias([fp8_relative_errors(errors, key, {s}) for s in sorted(keep)])


def fit(errors: Errors, keep: set[str]) -> Key:
    """(matmul, fp8) efficiencies fitted on the runs of the sources in ``keep``: matmul on
    their BF16 runs, then fp8 on their FP8 runs, each against its source's BF16 level
    (:func:`fp8_relative_errors`; ``FP8_PRIOR`` when they have no FP8 run). Each is a scale
    on time, so each is the grid value that centres its runs: the median signed error
    nearest zero, every source weighing the same (:func:`_weighted_bias`; a median-unbiased
    calibration; ties to the lower value)."""
    default_fp8 = FP8_PRIOR
    me = min(MATMUL_GRID, key=lambda v: _source_bias(errors, (v, default_fp8), keep))
    if not errors.select((me, default_fp8), keep, True):
        return me, default_fp8
    fe = min(FP8_GRID, key=lambda v: _fp8_bias(errors, (me, v), keep))
    return me, fe


def summary(errors: list[float]) -> dict[str, float]:
    """Median and worst |error| and mean signed error."""
    return {"n": len(errors), "median": _median_abs(errors),
            "worst": max(abs(e) for e in errors), "mean_signed": statistics.fmean(errors)}


def leave_one_source_out(cases: list[Case]) -> dict[str, Any]:
    """Per held-out source: the fitted pair and its errors; overall; and in sample."""
    errors = Errors(cases)
    sources = sorted({c.source for c in cases})
    result: dict[str, Any] = {"sources": {}, "runs": {}}
    pooled: list[float] = []
    for held in sources:
        key = fit(errors, set(sources) - {held})
        held_errors = errors.select(key, {held})
        pooled += held_errors
        result["sources"][held] = {"fitted": key, **summary(held_errors)}
        for c in cases:
            if c.source == held:
                result["runs"][c.id] = {"source": c.source, "measured_s": c.measured_s,
                                        "error": errors.of(c, key), "gpu": c.gpu,
                                        "precision": c.precision}
    result["overall"] = summary(pooled)
    key = fit(errors, set(sources))
    result["in_sample"] = {"fitted": key, **summary(errors.select(key, set(sources))),
                           "sources": {s: summary(errors.select(key, {s})) for s in sources}}
    reference = Errors(reference_cases())
    result["reference"] = {c.id: {"source": c.source, "measured_s": c.measured_s,
                                  "error": reference.of(c, key)} for c in reference.cases}
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


def logged_memory_check() -> dict[str, Any]:
    """The planner's memory of the most loaded rank against BigScience's logged nvidia-smi
    memory (``memory_gb_logged``: the first node, allocator reserve and CUDA context in), and
    what it says of the layouts that ran out of memory (``outcome``)."""
    ratios, oom = [], []
    for run in json.loads((DATA / "published_runs.json").read_text())["runs"]:
        if "memory_gb_logged" not in run and run.get("outcome") != "out of memory":
            continue
        model, cluster, training, fixed = published_inputs(run)
        constants = replace(DEFAULT_CONSTANTS, tp_overlap=run.get("tp_comm_overlap", "backward"))
        plan = search(model, cluster, training, fixed, constants, exact_top=1).plans[0]
        planned = plan.memory.total / GIB
        if "memory_gb_logged" in run:
            ratios.append(run["memory_gb_logged"] * 1e9 / GIB / planned)
        else:
            oom.append({"id": run["id"], "planned_gib": planned, "fits": plan.fits})
    return {"logged_over_planned": ratios, "out_of_memory": oom}


def _line(label: str, s: dict[str, Any]) -> str:
    fitted = s.get("fitted")
    pair = f"fitted {fitted[0]:.2f}/{fitted[1]:.2f}  " if fitted else " " * 19
    return (f"  {label:26} {pair}median {s['median']:6.1%}  worst {s['worst']:6.1%}  "
            f"mean signed {s['mean_signed']:+6.1%}  (n={s['n']})")


def main(argv: list[str]) -> int:
    result = leave_one_source_out(load_cases())
    result["memory"] = memory_check()
    result["logged_memory"] = logged_memory_check()
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
    print("not scored, predicted for the record with the in-sample fit (data: reference):")
    for run_id, r in result["reference"].items():
        print(f"  {run_id:34} A100  bf16  measured {r['measured_s']:8.2f} s"
              f"  error {r['error']:+6.1%}")
    memory = [abs(r[k]) for r in result["memory"] for k in ("states_error", "activations_error")
              if r.get(k) is not None]
    print(f"memory (Korthikanti Fig. 1): worst |error| {max(memory):.1%} over {len(memory)} "
          "figures")
    logged = result["logged_memory"]
    ratios = logged["logged_over_planned"]
    print(f"memory (BigScience's nvidia-smi logs, n={len(ratios)}): logged / planned median "
          f"{statistics.median(ratios):.2f}, {min(ratios):.2f} to {max(ratios):.2f}")
    for r in logged["out_of_memory"]:
        verdict = "fits" if r["fits"] else "does not fit"
        print(f"  ran out of memory: {r['id']:42} planned {r['planned_gib']:5.1f} GiB, {verdict}")
    constants = ", ".join(f"{name}={getattr(DEFAULT_CONSTANTS, name)}"
                          for name in Constants.__dataclass_fields__)
    print(f"shipped constants: {constants}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
