"""Pipeline equals one process: loss and every gradient, two optimizer steps, every schedule.

Each rank count runs one launched process group that loops over all cases (spawning a group per
case would cost seconds each); each case is then reported as its own test. The reference is a
deep copy of the whole model trained in one process on the whole batch with a mean loss.
Registered schedules are picked up from the registry, so new generators are covered as they
are added; a hand-written split-backward (I/W) CSV, a V-shaped placement with same-rank
hand-off, and a tied embedding (one tensor in the reference, a copy per stage in the pipeline)
are checked as well.
"""

from __future__ import annotations

import pytest

from stagewise.errors import ScheduleError
from stagewise.runtime import launch
from stagewise.schedules import Schedule, build, names
from workers.pipeline import Case, case_label, check_rank

torch = pytest.importorskip("torch")

# Hand-written ZB-H1-like schedule on 2 ranks: I as soon as possible, W deferred into gaps.
SPLIT_CSV = """0F0,0F1,0I0,0F2,0I1,0W0,0F3,0I2,0W1,0I3,0W2,0W3
1F0,1I0,1F1,1W0,1I1,1F2,1W1,1I2,1F3,1W2,1I3,1W3
"""
# V-shaped placement (rank 0: stages 0 and 3, rank 1: stages 1 and 2): 1 -> 2 stays on rank 1.
V_CSV = """0F0,0F1,3F0,3I0,3F1,3I1,0I0,0W0,3W0,0I1,3W1,0W1
1F0,2F0,1F1,2F1,2B0,1B0,2B1,1B1
"""


def _cases(num_ranks: int, built: set[str] | None = None) -> list[Case]:
    cases = []
    sizes = sorted({1, num_ranks - 1, num_ranks, 2 * num_ranks + 1})
    for name in names():
        for m in sizes:
            try:
                schedule = build(name, num_ranks=num_ranks, num_microbatches=m)
            except ScheduleError:
                continue  # the schedule does not allow this m (e.g. DualPipeV needs m >= 2p)
            cases.append(Case(schedule, batch_size=m + 2))
            if built is not None:
                built.add(name)
    # Tied input embedding and output projection: across ranks (1f1b, interleaved), with split
    # backward (zb-h1), and on one rank under V placement (zb-v puts stages 0 and last together).
    for name in ("1f1b", "interleaved-1f1b", "zb-h1", "zb-v"):
        if name in names():
            schedule = build(name, num_ranks=num_ranks, num_microbatches=num_ranks)
            cases.append(Case(schedule, batch_size=num_ranks + 2, tied=True))
    if num_ranks == 2:
        cases.append(Case(Schedule.from_csv(SPLIT_CSV, "split-csv"), batch_size=8))
        cases.append(Case(Schedule.from_csv(V_CSV, "v-csv"), batch_size=5))
    return cases


CASES = {p: _cases(p) for p in (2, 4)}
PARAMS = [(p, case_label(c)) for p, cases in CASES.items() for c in cases]


@pytest.fixture(scope="module")
def results() -> dict[int, list[dict[str, list[str]]]]:
    return {}


Results = dict[int, list[dict[str, list[str]]]]


def _run(results: Results, num_ranks: int) -> list[dict[str, list[str]]]:
    if num_ranks not in results:
        results[num_ranks] = launch(
            check_rank, num_ranks, (CASES[num_ranks],), timeout=150, threads=1
        )
    return results[num_ranks]


@pytest.mark.multiproc
@pytest.mark.timeout(200)
@pytest.mark.parametrize(("num_ranks", "label"), PARAMS, ids=[f"{p}-{lbl}" for p, lbl in PARAMS])
def test_matches_single_process(
    results: dict[int, list[dict[str, list[str]]]], num_ranks: int, label: str
) -> None:
    per_rank = _run(results, num_ranks)
    assert len(per_rank) == num_ranks
    problems = [line for rank_result in per_rank for line in rank_result[label]]
    assert not problems, "\n".join(problems[:10])


def test_registry_schedules_are_all_covered() -> None:
    built: set[str] = set()
    _cases(4, built)
    assert built == set(names())
    assert any(case.schedule.splits_backward for case in CASES[2])
