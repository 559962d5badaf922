"""A training step predicted from measured costs, also on a machine with fewer cores than ranks.

The planner's :func:`~stagewise.plan.steptime.step_time` derives its costs from a GPU model;
here the costs are seconds measured on the machine itself (:class:`MeasuredCosts`: one
micro-batch's forward and backward per stage, the bytes each stage sends, and per stage the
data-parallel gradient all-reduce and the optimizer step). The step is the pipeline, then on
each rank its stages' all-reduces (one stream, each started when the stage's last backward
ended: what ``runtime.mesh.OverlappedAverage`` does), the loss all-reduce on the last stage's
rank (with data parallelism), then the optimizer; it ends with the latest rank.

Two pipeline models:

- :func:`predict_step` runs :func:`stagewise.sim.simulate`, each rank computing at full speed
  (``factor`` multiplies every compute cost: ``ranks / cores`` says "every rank always shares
  the cores evenly", pessimistic for a pipeline whose ranks wait).
- :func:`shared_cores_step` runs the same rules as an event simulation in which the ranks of
  every replica that are computing at an instant share ``cores`` evenly: each computes at
  ``min(1, cores / computing)`` of its full speed; a rank waiting for a neighbour or for an
  all-reduce takes no core. With ``cores`` at least the number of ranks it equals
  :func:`predict_step`.

Pure Python (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

from stagewise.errors import ConfigError
from stagewise.schedules.ir import Op, Schedule
from stagewise.sim import Costs, Link, simulate

__all__ = ["MeasuredCosts", "StepPrediction", "predict_step", "shared_cores_step"]


@dataclass(frozen=True)
class MeasuredCosts:
    """Measured seconds of one layout, per (virtual) stage.

    Attributes:
        forward: one micro-batch's forward through each stage.
        backward: one micro-batch's whole backward through each stage.
        send_bytes: bytes of the activation (and of its gradient) leaving each stage.
        reduce: the all-reduce of each stage's gradients over the data-parallel group (0 when
            there is none).
        optimizer: the optimizer step (and ``zero_grad``) on each stage's parameters.
        loss_reduce: the loss all-reduce on the last stage's rank (0 without data parallelism).
    """

    forward: tuple[float, ...]
    backward: tuple[float, ...]
    send_bytes: tuple[float, ...]
    reduce: tuple[float, ...]
    optimizer: tuple[float, ...]
    loss_reduce: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.forward)
        for name in ("backward", "send_bytes", "reduce", "optimizer"):
            values = getattr(self, name)
            if len(values) != n:
                raise ConfigError(f"measured costs: {name} has {len(values)} stages, forward {n}")
            if any(v < 0 for v in values):
                raise ConfigError(f"measured costs: {name} {values} has a negative value")
        if any(v < 0 for v in self.forward) or self.loss_reduce < 0:
            raise ConfigError("measured costs: forward and loss_reduce must be >= 0")

    def costs(self, factor: float = 1.0) -> Costs:
        """The simulator's costs, compute multiplied by ``factor``."""
        return Costs.per_stage(
            [factor * f for f in self.forward], [factor * b for b in self.backward],
            send_bytes=self.send_bytes,
        )


@dataclass(frozen=True)
class StepPrediction:
    """One predicted step, in seconds.

    Attributes:
        step: the whole step (the latest rank's end).
        pipeline: the pipeline's makespan.
        rank_ends: each rank's end of the step (pipeline, all-reduces, optimizer).
    """

    step: float
    pipeline: float
    rank_ends: tuple[float, ...]

    @property
    def tail(self) -> float:
        """What the step adds after the pipeline."""
        return self.step - self.pipeline


def _check(schedule: Schedule, costs: MeasuredCosts) -> None:
    if len(costs.forward) != schedule.num_stages:
        raise ConfigError(
            f"measured costs describe {len(costs.forward)} stages but schedule "
            f"{schedule.name!r} has {schedule.num_stages}: give one cost per stage"
        )


def predict_step(
    schedule: Schedule, costs: MeasuredCosts, link: Link, factor: float = 1.0
) -> StepPrediction:
    """The step from :func:`stagewise.sim.simulate`, every compute cost times ``factor``.

    Raises:
        ConfigError: costs for another number of stages, or ``factor`` <= 0.

    Example:
        >>> from stagewise.schedules import build
        >>> one = MeasuredCosts((1.0,), (2.0,), (0.0,), (0.5,), (0.25,))
        >>> predict_step(build("1f1b", num_ranks=1, num_microbatches=2), one, Link()).step
        6.75
    """
    _check(schedule, costs)
    if factor <= 0:
        raise ConfigError(f"factor must be > 0, got {factor}")
    timeline = simulate(schedule, costs.costs(factor), link)
    done = [0.0] * schedule.num_stages
    busy_until = [0.0] * schedule.num_ranks
    for e in timeline.events:
        if e.op is not Op.F:
            done[e.stage] = max(done[e.stage], e.end - timeline.start)
        busy_until[e.rank] = max(busy_until[e.rank], e.end - timeline.start)
    ends = []
    for rank in range(schedule.num_ranks):
        stream = 0.0
        for stage in sorted(schedule.stages_of(rank), key=lambda s: done[s]):
            stream = max(stream, done[stage]) + costs.reduce[stage]
        end = max(busy_until[rank], stream) + _loss_reduce(schedule, costs, rank)
        ends.append(end + factor * sum(costs.optimizer[s] for s in schedule.stages_of(rank)))
    return StepPrediction(max(ends), timeline.makespan, tuple(ends))


def _loss_reduce(schedule: Schedule, costs: MeasuredCosts, rank: int) -> float:
    return costs.loss_reduce if schedule.num_stages - 1 in schedule.stages_of(rank) else 0.0


@dataclass
class _Task:
    """One piece of a lane's work: ``work`` seconds at full speed, on a core or not."""

    work: float
    compute: bool
    needs: list[tuple[int, float]]  # (task id, delay after it ends)
    end: float = -1.0


def _pipeline_tasks(
    schedule: Schedule, costs: MeasuredCosts, link: Link
) -> tuple[list[_Task], list[list[int]], dict[tuple[int, Op, int], int]]:
    """Every action as a compute task, one lane per rank, with simulate()'s dependencies."""
    sim_costs = costs.costs()
    hop = [link.transfer_time(b) for b in costs.send_bytes]
    tasks: list[_Task] = []
    lanes: list[list[int]] = []
    ids: dict[tuple[int, Op, int], int] = {}
    for row in schedule.actions:
        lane = []
        for stage, op, j in row:
            ids[(stage, op, j)] = len(tasks)
            lane.append(len(tasks))
            tasks.append(_Task(sim_costs.duration(stage, op), True, []))
        lanes.append(lane)
    placement, last = schedule.placement, schedule.num_stages - 1

    def delay(stage: int, neighbour: int, boundary: int) -> float:
        return 0.0 if placement[stage] == placement[neighbour] else hop[boundary]

    for (stage, op, j), task in ids.items():
        needs = tasks[task].needs
        if op is Op.F and stage > 0:
            needs.append((ids[(stage - 1, Op.F, j)], delay(stage, stage - 1, stage - 1)))
        elif op is Op.W:
            needs.append((ids[(stage, Op.I, j)], 0.0))
        elif op is not Op.F:
            needs.append((ids[(stage, Op.F, j)], 0.0))
            if stage < last:
                producer = ids.get((stage + 1, Op.B, j), ids.get((stage + 1, Op.I, j)))
                assert producer is not None, "a valid schedule runs every backward"
                needs.append((producer, delay(stage, stage + 1, stage)))
    return tasks, lanes, ids


def _add_tail(
    schedule: Schedule, costs: MeasuredCosts, tasks: list[_Task], lanes: list[list[int]],
    ids: dict[tuple[int, Op, int], int],
) -> None:
    """Per rank: a communication lane (its stages' all-reduces in the order its row finishes
    them, then the loss all-reduce) and the optimizer at the end of its compute lane."""
    for rank in range(schedule.num_ranks):
        row = lanes[rank]
        last_grad: dict[int, int] = {}
        for stage, op, j in schedule.actions[rank]:
            if op is not Op.F:
                last_grad[stage] = ids[(stage, op, j)]
        comm = []
        for stage, task in sorted(last_grad.items(), key=lambda item: item[1]):
            comm.append(len(tasks))
            tasks.append(_Task(costs.reduce[stage], False, [(task, 0.0)]))
        comm.append(len(tasks))
        tasks.append(_Task(_loss_reduce(schedule, costs, rank), False, [(row[-1], 0.0)]))
        optimizer = sum(costs.optimizer[s] for s in schedule.stages_of(rank))
        row.append(len(tasks))
        tasks.append(_Task(optimizer, True, [(comm[-1], 0.0)]))
        lanes.append(comm)


def shared_cores_step(
    schedule: Schedule, costs: MeasuredCosts, link: Link, cores: float, replicas: int = 1
) -> StepPrediction:
    """The step when ``replicas`` copies of the pipeline share ``cores`` (see module doc).

    The replicas run in lockstep (they are identical), so when ``n`` ranks of one replica
    compute, ``replicas * n`` processes share the cores and each gets
    ``min(1, cores / (replicas * n))`` of its full speed. Communication takes no core.

    Raises:
        ConfigError: costs for another number of stages, ``cores`` <= 0 or ``replicas`` < 1.

    Example:
        >>> from stagewise.schedules import build
        >>> one = MeasuredCosts((1.0,), (2.0,), (0.0,), (0.5,), (0.25,))
        >>> shared_cores_step(build("1f1b", num_ranks=1, num_microbatches=2), one, Link(),
        ...                   cores=1, replicas=2).step
        13.0
    """
    _check(schedule, costs)
    if cores <= 0 or replicas < 1:
        raise ConfigError(f"need cores > 0 and replicas >= 1, got cores={cores}, "
                          f"replicas={replicas}")
    tasks, lanes, ids = _pipeline_tasks(schedule, costs, link)
    pipeline_tasks = len(tasks)
    _add_tail(schedule, costs, tasks, lanes, ids)
    _run_shared(tasks, lanes, cores / replicas)
    ranks = schedule.num_ranks
    ends = tuple(
        max(tasks[t].end for t in lanes[r] + lanes[ranks + r]) for r in range(ranks)
    )
    pipeline = max(task.end for task in tasks[:pipeline_tasks])
    return StepPrediction(max(ends), pipeline, ends)


def _run_shared(tasks: list[_Task], lanes: list[list[int]], cores: float) -> None:
    """Fill in every task's end: lanes run their tasks in order, a task starts when its lane
    is free and its needs (plus delays) are met; running compute tasks share ``cores``."""
    now = 0.0
    position = [0] * len(lanes)
    free_at = [0.0] * len(lanes)
    running: dict[int, tuple[int, float]] = {}  # lane -> (task, work left)
    while True:
        wakes = _start_ready(tasks, lanes, position, free_at, running, now)
        if not running and not wakes:
            break
        computing = sum(1 for task, _ in running.values() if tasks[task].compute)
        rate = min(1.0, cores / computing) if computing else 1.0
        finish = {
            lane: now + left / (rate if tasks[task].compute else 1.0)
            for lane, (task, left) in running.items()
        }
        step_to = min([*finish.values(), *wakes])
        for lane, (task, left) in list(running.items()):
            if finish[lane] <= step_to * (1 + 1e-12):
                tasks[task].end = free_at[lane] = step_to
                position[lane] += 1
                del running[lane]
            else:
                speed = rate if tasks[task].compute else 1.0
                running[lane] = (task, left - (step_to - now) * speed)
        now = step_to
    if any(p < len(lane) for p, lane in zip(position, lanes, strict=True)):
        raise ConfigError("shared-cores simulation stalled: the schedule deadlocks")


def _start_ready(
    tasks: list[_Task], lanes: list[list[int]], position: list[int], free_at: list[float],
    running: dict[int, tuple[int, float]], now: float,
) -> list[float]:
    """Start every lane's next task whose needs are met by ``now``; return the later times
    at which waiting tasks become ready."""
    wakes: list[float] = []
    started = True
    while started:
        started, wakes = False, []
        for lane, row in enumerate(lanes):
            if lane in running or position[lane] >= len(row):
                continue
            task = tasks[row[position[lane]]]
            if any(tasks[need].end < 0 for need, _ in task.needs):
                continue
            ready = max([free_at[lane], *(tasks[n].end + d for n, d in task.needs)])
            if ready > now:
                wakes.append(ready)
            elif task.work <= 0:
                task.end = free_at[lane] = now
                position[lane] += 1
                started = True
            else:
                running[lane] = (row[position[lane]], task.work)
                started = True
    return wakes
