"""The event simulator and the Timeline measures, against timelines worked out by hand."""

from __future__ import annotations

import copy
import pickle
from dataclasses import FrozenInstanceError, replace
from fractions import Fraction

import pytest

from stagewise.errors import ConfigError
from stagewise.schedules import Action, Op, Schedule, build, parse_action
from stagewise.sim import Costs, Event, Link, Timeline, simulate
from stagewise.sim.limits import MAX_ACTIONS, require_simulable


def two_stage_costs(**extra: object) -> Costs:
    # Stage 0: F=1, B=2; stage 1 (a heavy last stage, e.g. the LM head): F=2, B=4.
    return Costs.per_stage(forward=[1, 2], backward=[2, 4], **extra)  # type: ignore[arg-type]


def spans(timeline: Timeline) -> dict[str, tuple[float, float]]:
    return {e.label: (e.start, e.end) for e in timeline.events}


def test_lesson_example_one_f_one_b() -> None:
    timeline = simulate(build("1f1b", num_ranks=4, num_microbatches=8))
    # (m + p - 1) slots of forward 1 + backward 2.
    assert timeline.makespan == pytest.approx(11 * 3)
    bubble = timeline.bubble()
    assert bubble.of_step == pytest.approx(3 / 11)
    assert bubble.vs_ideal == pytest.approx(3 / 8)
    assert [timeline.busy(r) for r in range(4)] == [24.0] * 4


def test_interleaving_halves_the_ideal_relative_bubble() -> None:
    plain = simulate(build("1f1b", num_ranks=4, num_microbatches=8)).bubble()
    two = simulate(build("interleaved-1f1b", num_ranks=4, num_microbatches=8, num_chunks=2))
    assert two.bubble().vs_ideal == pytest.approx(plain.vs_ideal / 2)
    assert two.makespan == pytest.approx(8 * 3 + 3 * 3 / 2)


def test_heavy_last_stage_by_hand() -> None:
    schedule = build("1f1b", num_ranks=2, num_microbatches=2)
    timeline = simulate(schedule, two_stage_costs())
    assert spans(timeline) == {
        "0F0": (0, 1), "0F1": (1, 2), "1F0": (1, 3), "1B0": (3, 7),
        "1F1": (7, 9), "1B1": (9, 13), "0B0": (7, 9), "0B1": (13, 15),
    }
    assert timeline.makespan == 15
    bubble = timeline.bubble()
    assert bubble.of_step == pytest.approx(12 / 30)
    assert bubble.vs_ideal == pytest.approx(12 / 18)


def test_latency_and_bandwidth_delay_cross_rank_dependencies() -> None:
    schedule = build("1f1b", num_ranks=2, num_microbatches=2)
    timeline = simulate(schedule, two_stage_costs(), Link(latency=0.5))
    assert spans(timeline)["1F0"] == (1.5, 3.5)
    assert spans(timeline)["0B0"] == (8.0, 10.0)
    assert timeline.makespan == 16.0
    # 100 bytes at 100 bytes per unit add one unit per hop on top of the latency.
    costs = two_stage_costs(send_bytes=[100, 100])
    slow = simulate(schedule, costs, Link(latency=0.5, bandwidth=100))
    assert spans(slow)["1F0"] == (2.5, 4.5)


def test_same_rank_neighbours_pay_no_transfer() -> None:
    # V placement: rank 0 holds stages 0 and 3, rank 1 holds 1 and 2; 1 -> 2 stays on rank 1.
    schedule = Schedule(
        name="v", num_ranks=2, num_stages=4, num_microbatches=1, placement=(0, 1, 1, 0),
        actions=(
            tuple(parse_action(a) for a in ["0F0", "3F0", "3B0", "0B0"]),
            tuple(parse_action(a) for a in ["1F0", "2F0", "2B0", "1B0"]),
        ),
    )
    costs = Costs.per_stage(forward=[1] * 4, backward=[1] * 4)
    timeline = simulate(schedule, costs, Link(latency=10))
    times = spans(timeline)
    assert times["2F0"][0] == times["1F0"][1]  # local hand-off
    assert times["1F0"][0] == 1 + 10  # crossed from rank 0


def test_memory_in_units_and_bytes() -> None:
    schedule = build("gpipe", num_ranks=2, num_microbatches=3)
    costs = Costs.uniform(schedule, activation_bytes=1000)
    timeline = simulate(schedule, costs)
    assert [timeline.peak_activations(r) for r in range(2)] == [3, 3]
    assert timeline.peak_activations(0, in_bytes=True) == 3000
    levels = [level for _, level in timeline.live_activations(1)]
    assert levels == [0, 1, 2, 3, 2, 1, 0]


def test_split_backward_frees_activations_at_w() -> None:
    schedule = Schedule.from_csv("0F0,0F1,0B0,0B1\n1F0,1I0,1F1,1I1,1W0,1W1\n")
    costs = Costs.per_stage(forward=[1, 1], backward=[2, 2], weight=[1, 1])
    timeline = simulate(schedule, costs)
    times = spans(timeline)
    assert times["1I0"] == (2, 3)  # I = B - W = 1
    assert times["1W0"] == (5, 6)
    assert times["1W1"] == (6, 7)
    # Both micro-batches stay alive on rank 1 until the deferred W's run; rank 0 frees at B.
    assert timeline.peak_activations(1) == 2
    assert [level for _, level in timeline.live_activations(1)][-3:] == [2, 1, 0]
    assert timeline.live_activations(0)[-1][1] == 0


def test_bubble_definitions_are_related() -> None:
    events = (Event(0, 0, Op.F, 0, 0, 1), Event(1, 1, Op.F, 0, 1, 4))
    timeline = Timeline(events, num_ranks=2, num_stages=2, num_microbatches=1, num_chunks=1,
                        schedule_name="hand")
    bubble = timeline.bubble()
    assert Fraction(bubble.of_step).limit_denominator() == Fraction(4, 8)
    assert bubble.vs_ideal == pytest.approx(bubble.of_step / (1 - bubble.of_step))


def test_cost_errors() -> None:
    schedule = build("1f1b", num_ranks=2, num_microbatches=2)
    with pytest.raises(ConfigError, match="exceeds the whole backward"):
        Costs.per_stage(forward=[1, 1], backward=[2, 2], weight=[3, 1])
    with pytest.raises(ConfigError, match="one cost per"):
        simulate(schedule, Costs.per_stage(forward=[1], backward=[2]))
    with pytest.raises(ConfigError, match="latency"):
        Link(latency=-1)


def test_the_size_limit_names_itself_and_the_fix() -> None:
    require_simulable(MAX_ACTIONS, "at the limit")
    with pytest.raises(ConfigError, match=r"1f1b p=4 has 1,000,001 actions, over the simulator's "
                       r"limit of 1,000,000 per schedule: use fewer ranks p or micro-batches m"):
        require_simulable(MAX_ACTIONS + 1, "1f1b p=4")


def reference_simulate(
    schedule: Schedule, costs: Costs, link: Link
) -> dict[tuple[int, int, Op, int], tuple[float, float]]:
    """A slow, obviously correct simulator: sweep the ranks until every action has run.

    An action runs when everything it depends on has run; it starts when its rank is free and
    its inputs have arrived (the link cost when they come from another rank).
    """
    end: dict[tuple[int, Op, int], float] = {}
    times: dict[tuple[int, int, Op, int], tuple[float, float]] = {}
    position, free = [0] * schedule.num_ranks, [0.0] * schedule.num_ranks
    progress = True
    while progress:
        progress = False
        for rank, row in enumerate(schedule.actions):
            while position[rank] < len(row):
                action = row[position[rank]]
                stage, op, j = action
                needs = _reference_inputs(schedule, costs, link, end, rank, action)
                if any(t is None for t in needs):
                    break
                start = free[rank]
                for t in needs:
                    assert t is not None
                    start = max(start, t)
                finish = start + costs.duration(stage, op)
                end[(stage, op, j)] = free[rank] = finish
                times[(rank, stage, op, j)] = (start, finish)
                position[rank] += 1
                progress = True
    return times


def _reference_inputs(
    schedule: Schedule,
    costs: Costs,
    link: Link,
    end: dict[tuple[int, Op, int], float],
    rank: int,
    action: Action,
) -> list[float | None]:
    """When each input of ``action`` is on ``rank``, given the finish times ``end`` so far
    (None: not made yet)."""
    stage, op, j = action
    needs: list[float | None] = []
    if op is Op.F and stage > 0:
        needs.append(_arrived(schedule, costs, link, stage - 1, end.get((stage - 1, Op.F, j)),
                              rank))
    elif op is Op.W:
        needs.append(end.get((stage, Op.I, j)))
    elif op in (Op.B, Op.I):
        needs.append(end.get((stage, Op.F, j)))
        if stage < schedule.num_stages - 1:
            grad = end.get((stage + 1, Op.B, j), end.get((stage + 1, Op.I, j)))
            # the gradient crosses the boundary between stage and stage + 1
            if grad is not None and schedule.placement[stage + 1] != rank:
                grad += link.transfer_time(costs.send_bytes[stage] if costs.send_bytes else 0.0)
            needs.append(grad)
    return needs


def _arrived(
    schedule: Schedule, costs: Costs, link: Link, stage: int, finished: float | None, rank: int
) -> float | None:
    """When ``stage``'s output, finished at ``finished``, is on ``rank``."""
    if finished is None or schedule.placement[stage] == rank:
        return finished
    return finished + link.transfer_time(costs.send_bytes[stage] if costs.send_bytes else 0)


@pytest.mark.parametrize(("name", "p", "m", "v"), [
    ("gpipe", 4, 6, 1), ("1f1b", 5, 7, 1), ("interleaved-1f1b", 4, 8, 2),
    ("interleaved-1f1b", 3, 9, 3), ("looped-bfs", 3, 5, 2), ("zb-h1", 4, 6, 1),
    ("zb-h2", 4, 9, 1), ("zb-v", 3, 6, 2), ("dualpipev", 3, 8, 2), ("auto", 3, 5, 2),
])
@pytest.mark.parametrize("latency", [0.0, 0.25])
def test_simulator_equals_a_reference_implementation(name: str, p: int, m: int, v: int,
                                                     latency: float) -> None:
    schedule = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
    n = schedule.num_stages
    costs = Costs.per_stage(
        [1 + 0.1 * s for s in range(n)], [2 + 0.3 * (s % 3) for s in range(n)],
        [0.7 + 0.05 * s for s in range(n)], send_bytes=[10.0 * s for s in range(n)],
    )
    link = Link(latency=latency, bandwidth=40.0)
    timeline = simulate(schedule, costs, link)
    got = {(e.rank, e.stage, e.op, e.microbatch): (e.start, e.end) for e in timeline.events}
    assert got == reference_simulate(schedule, costs, link)  # exactly: same sums, same order
    assert len(timeline.events) == schedule.num_actions
    again = Timeline.of(schedule, timeline.events)
    assert [again.peak_activations(r) for r in range(p)] == [
        max(level for _, level in timeline.live_activations(r)) for r in range(p)]


@pytest.mark.parametrize(("p", "m"), [(4, 8), (16, 256)])  # run by run; level by level
def test_a_simulated_timeline_behaves_as_one_built_from_its_events(p: int, m: int) -> None:
    """The simulator hands the Timeline columns and the events are built when first read;
    equality, copies, pickling and dataclasses.replace see the same events as a Timeline
    made from them."""
    schedule = build("1f1b", num_ranks=p, num_microbatches=m)
    sizes = [10.0 + s for s in range(p)]
    costs = Costs.per_stage([1.0 + 0.1 * s for s in range(p)], [2.0] * p, activation_bytes=sizes)
    timeline = simulate(schedule, costs)
    rebuilt = Timeline.of(schedule, timeline.events, activation_bytes=costs.activation_bytes)
    assert timeline == rebuilt
    assert pickle.loads(pickle.dumps(simulate(schedule, costs))) == rebuilt
    assert copy.deepcopy(simulate(schedule, costs)).rank_stats() == rebuilt.rank_stats()
    assert [timeline.rank_events(r) for r in range(p)] == [rebuilt.rank_events(r)
                                                            for r in range(p)]
    halved = replace(timeline, activation_bytes=tuple(b / 2 for b in sizes))
    assert [halved.peak_activations(r, in_bytes=True) for r in range(p)] == [
        timeline.peak_activations(r, in_bytes=True) / 2 for r in range(p)]
    with pytest.raises(FrozenInstanceError):
        timeline.events = ()  # type: ignore[misc]


def test_a_timeline_refuses_events_and_the_simulators_columns_together() -> None:
    schedule = build("1f1b", num_ranks=2, num_microbatches=2)
    timeline = simulate(schedule, Costs.per_stage([1.0, 1.0], [2.0, 2.0]))
    columns = timeline._simulated  # what the simulator handed it
    assert columns is not None
    assert Timeline.of(schedule, (), simulated=columns) == timeline
    with pytest.raises(ValueError, match="not both"):
        Timeline.of(schedule, timeline.events[:1], simulated=columns)
