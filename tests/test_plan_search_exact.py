"""The fast search (memoised parts, pruning by lower bound, the timed walk) against the exact
one: every candidate evaluated on its own, with a fresh cache, and every fitting plan timed."""

from __future__ import annotations

import pytest

from stagewise.errors import ScheduleError, StagewiseError
from stagewise.plan import Cluster, TrainingSpec, evaluate, get_gpu, get_model
from stagewise.plan.search import candidates, search
from stagewise.plan.timed_walk import idle_and_slack, idle_and_slack_in_order
from stagewise.schedules import Action, Op, Schedule, build

H100 = get_gpu("h100")

# (model, nodes, GPUs per node, sequence, global batch): one node and two, 1..32 micro-batches.
CASES = [
    ("llama-2-7b", 1, 8, 4096, 16),
    ("llama-2-13b", 2, 8, 2048, 32),
    ("gpt2-xl", 1, 4, 1024, 8),
    # m = 3, 6, 12, 24 on p up to 8: interleaved sized from its rows (p does not divide m)
    # and from its closed form, ZB-V below 2p - 1, DualPipeV refused below 2p.
    ("llama-2-7b", 1, 8, 4096, 24),
]


@pytest.mark.parametrize(("name", "nodes", "per_node", "seq", "batch"), CASES)
def test_fast_search_ranks_as_the_exact_one(
    name: str, nodes: int, per_node: int, seq: int, batch: int
) -> None:
    model, cluster = get_model(name), Cluster(H100, nodes, per_node)
    training = TrainingSpec(seq_len=seq, global_batch=batch)
    k = 10
    result = search(model, cluster, training, exact_top=k)
    exact = {}
    refused = []
    for config in candidates(model, cluster, training):
        try:  # its own cache: nothing shared with other plans
            plan = evaluate(model, cluster, training, config)
        except StagewiseError as err:
            refused.append((config.describe(), str(err)))
            continue
        exact[plan.config.describe()] = plan
    assert result.skipped == refused
    # the exhaustive side enumerates the layer split too: both splits occur where pp > 1
    assert {p.config.layer_split for p in exact.values()} == {"balanced", "edges"}
    fast = {plan.config.describe(): plan for plan in result.plans}
    assert fast.keys() == exact.keys()
    for key, plan in fast.items():  # every plan's memory and verdict, to the byte
        assert plan.memory == exact[key].memory
        assert plan.fits == exact[key].fits
    times = sorted(p.time.step_s for p in exact.values() if p.fits)
    ranked = result.fitting
    assert len(ranked) == len(times)
    assert [p.time.step_s for p in ranked[:k]] == times[:k]
    for plan in ranked[:k]:
        assert plan.time == exact[plan.config.describe()].time
    best_of_layout: dict[tuple[int, int], float] = {}
    for plan in exact.values():
        if plan.fits:
            layout = (plan.config.tp, plan.config.pp)
            best_of_layout[layout] = min(plan.time.step_s, best_of_layout.get(layout, 1e9))
    first_of_layout: dict[tuple[int, int], float] = {}
    for plan in ranked:
        first_of_layout.setdefault((plan.config.tp, plan.config.pp), plan.time.step_s)
    assert first_of_layout == best_of_layout


def test_plans_timed_after_the_search_are_timed_as_alone() -> None:
    """The search releases its schedules when it returns; a plan it left untimed, timed
    later (its shapes built again), has the time of the plan evaluated on its own."""
    model, cluster = get_model("llama-2-13b"), Cluster(H100, 2, 8)
    training = TrainingSpec(seq_len=2048, global_batch=32)
    result = search(model, cluster, training, exact_top=1)
    untimed = [plan for plan in result.fitting if "time" not in plan.__dict__]
    assert len(untimed) > 10  # the bound left most plans untimed
    for plan in untimed[::5]:
        alone = evaluate(model, cluster, training, plan.config)
        assert plan.time == alone.time
        assert plan.time.step_s >= plan.lower_bound_s


def test_timed_walk_names_a_deadlock() -> None:
    """Rank 1 runs its backward before its forward: the walk stops and the validator says so."""
    rows = (
        (Action(0, Op.F, 0), Action(0, Op.B, 0)),
        (Action(1, Op.B, 0), Action(1, Op.F, 0)),
    )
    schedule = Schedule(name="bad", num_ranks=2, num_stages=2, num_microbatches=1,
                        placement=(0, 1), actions=rows)
    with pytest.raises(ScheduleError, match="deadlock"):
        idle_and_slack(schedule, (1.0, 1.0), (2.0, 2.0), (1.0, 1.0), (0.0, 0.0))


def test_timed_walk_names_a_missing_action() -> None:
    """A forward without its backward runs to the end of the rows, then is refused."""
    rows = ((Action(0, Op.F, 0), Action(0, Op.B, 0)), (Action(1, Op.F, 0),))
    schedule = Schedule(name="short", num_ranks=2, num_stages=2, num_microbatches=1,
                        placement=(0, 1), actions=rows)
    with pytest.raises(ScheduleError, match="no backward"):
        idle_and_slack(schedule, (1.0, 1.0), (2.0, 2.0), (1.0, 1.0), (0.0, 0.0))


@pytest.mark.parametrize(("name", "p", "v"), [("1f1b", 4, 1), ("interleaved-1f1b", 3, 2),
                                              ("zb-h2", 3, 1), ("dualpipev", 4, 2)])
def test_recorded_order_times_other_costs_as_the_walk(name: str, p: int, v: int) -> None:
    """The order one walk recorded gives, for other costs, the times a new walk gives."""
    schedule = build(name, num_ranks=p, num_microbatches=3 * p + 1, num_chunks=v)
    stages = p * v
    order: list[Action] = []
    ones = tuple([1.0] * stages)
    idle_and_slack(schedule, ones, ones, tuple([0.5] * stages), tuple([0.0] * stages), order)
    assert len(order) == schedule.num_actions
    forward = tuple(1.0 + 0.1 * (s % 3) for s in range(stages))
    backward = tuple(2.2 * f for f in forward)
    weight = tuple(0.8 * f for f in forward)
    hops = tuple(0.05 * (s % 2) for s in range(stages))
    walked = idle_and_slack(schedule, forward, backward, weight, hops)
    assert idle_and_slack_in_order(schedule, order, forward, backward, weight, hops) == walked
