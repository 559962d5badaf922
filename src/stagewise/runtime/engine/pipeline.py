"""``Pipeline``: one interpreter that runs any validated schedule on real tensors.

Each rank walks its own row of the schedule. Communication comes from the placement (see
``lowering``): a forward whose next stage lives elsewhere sends its output; a backward (B or I)
whose previous stage lives elsewhere sends the input gradient; consecutive stages on the same
rank hand tensors over directly. The four ops:

- ``F``: run the stage on its input (a fresh leaf, so the input gradient can be read later); on
  the last stage also compute the loss, weighted by the micro-batch's share of the batch.
- ``B``: full backward: parameter gradients accumulate into ``.grad``; the input gradient goes
  to the previous stage.
- ``I``: input gradient only, graph kept (see ``split_backward``).
- ``W``: the weight gradients deferred by ``I``.

The step's loss is the weighted mean over micro-batches, so every ``.grad`` equals what one
process running the whole batch with a mean loss computes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from stagewise.errors import ConfigError, RuntimeFailure
from stagewise.runtime.engine.failure import FailureBoard, NonFiniteLoss, PeerFailure
from stagewise.runtime.engine.lowering import Kind, lower
from stagewise.runtime.engine.microbatch import loss_weights, split_batch
from stagewise.runtime.engine.p2p import Groups, Shapes, Wire, warm_up
from stagewise.runtime.engine.saved import SavedBytes
from stagewise.runtime.engine.split_backward import WeightGrad, backward_input
from stagewise.runtime.engine.tied import Ties
from stagewise.schedules.ir import Action, Op, Schedule
from stagewise.schedules.validate import check
from stagewise.sim.timeline import Event

__all__ = ["LossFn", "Pipeline"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_OP_NAMES = {Op.F: "forward", Op.B: "backward", Op.I: "input-grad", Op.W: "weight-grad"}


def describe(action: Action) -> str:
    """``1F3 (forward of stage 1, micro-batch 3)``."""
    what = _OP_NAMES[action.op]
    return f"{action} ({what} of stage {action.stage}, micro-batch {action.microbatch})"


class Pipeline:
    """Run one rank's share of a pipeline schedule.

    Args:
        schedule: any valid schedule (``stagewise.schedules.build(...)`` or a loaded CSV).
        stages: ``{stage index: module}`` for exactly the stages this rank holds.
        loss_fn: ``loss_fn(output, target) -> scalar``, a mean over the micro-batch's rows;
            needed on the rank holding the last stage.
        group: the pipeline's process group (group rank r runs row r); default group if None.
            Under NCCL with CUDA stages, activations and gradients go straight through this
            group between the GPUs; a gloo group over the same ranks, made here (a collective
            call on the default group), carries the small headers and the first step's
            tensors of a shape not seen before (see ``p2p``). Under gloo, this group carries
            everything, through host memory.
        timeout: seconds any single wait for another rank may take.
        check_finite: raise :class:`NonFiniteLoss` when a micro-batch's loss is NaN or inf.
        store: a store every rank reaches (the one they met through) used to stop all ranks at
            the first failure; None to rely on the timeout and closed connections.
        count_saved: count bytes saved for backward per forward (see :attr:`saved_bytes`).
        on_action: called with each action just before it runs (progress reporting).
        tied: weights shared between stages, each ``{stage: parameter name}`` (for example
            the embedding of stage 0 and the output projection of the last stage). Their
            copies start equal and get the summed gradient after each step (see ``tied``).

    After each step: ``events`` holds this rank's timed actions (``time.perf_counter()``
    seconds, from the moment the input was there to the end), ``saved_bytes`` the bytes saved
    for backward per (stage, micro-batch) when ``count_saved``.

    Raises:
        ScheduleError: the schedule is invalid.
        ConfigError: the stages do not match the schedule's placement for this rank, or the
            group does not have one rank per schedule row.

    Example (on each rank, after ``torch.distributed.init_process_group``)::

        sched = stagewise.schedules.build("1f1b", num_ranks=2, num_microbatches=4)
        pipe = stagewise.Pipeline(sched, {rank: my_stage}, loss_fn=nn.functional.cross_entropy)
        loss = pipe.step(inputs, targets)   # the mean loss on the last rank, else None
        optimizer.step()
    """

    def __init__(
        self,
        schedule: Schedule,
        stages: Mapping[int, nn.Module],
        loss_fn: LossFn | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        timeout: float = 300.0,
        check_finite: bool = False,
        store: dist.Store | None = None,
        count_saved: bool = False,
        on_action: Callable[[Action], None] | None = None,
        tied: Sequence[Mapping[int, str]] = (),
    ) -> None:
        check(schedule)
        self.schedule = schedule
        self.group = group
        self.rank = dist.get_rank(group)
        world = dist.get_world_size(group)
        if world != schedule.num_ranks:
            raise ConfigError(
                f"schedule {schedule.name!r} has {schedule.num_ranks} ranks but the process "
                f"group has {world}: build the schedule with num_ranks={world}"
            )
        mine = set(schedule.stages_of(self.rank))
        if set(stages) != mine:
            raise ConfigError(
                f"rank {self.rank} holds stages {sorted(mine)} in schedule {schedule.name!r} "
                f"but was given stages {sorted(stages)}: pass exactly those stages"
            )
        if schedule.num_stages - 1 in mine and loss_fn is None:
            raise ConfigError(f"rank {self.rank} holds the last stage: pass loss_fn")
        self.stages = dict(stages)
        self.loss_fn = loss_fn
        self.timeout = timeout
        self.check_finite = check_finite
        self.count_saved = count_saved
        self.on_action = on_action
        self.device = _device_of(self.stages.values())
        self._groups = _groups(group, self.device)
        self._board = FailureBoard(store)
        self._plan = lower(schedule, self.rank)
        warm_up(_neighbours(schedule), self.rank, self._groups)
        self._params = {
            s: [p for p in m.parameters() if p.requires_grad] for s, m in self.stages.items()
        }
        first_tag = 8 * schedule.num_stages * schedule.num_microbatches  # above every step tag
        self._ties = Ties(tied, self.stages, schedule, self.rank, self._groups.meta, first_tag)
        self._ties.sync_values()
        self.events: list[Event] = []
        self.saved_bytes: dict[tuple[int, int], int] = {}
        # The shape of every message in the previous step, as sent and as received.
        self._sent_shapes: Shapes = {}
        self._received_shapes: Shapes = {}

    # --- the step ----------------------------------------------------------------------------

    def step(
        self, inputs: torch.Tensor | None = None, targets: torch.Tensor | None = None,
        *, weights: Sequence[float] | None = None,
    ) -> torch.Tensor | None:
        """Run one step of the schedule: forward and backward of every micro-batch.

        Args:
            inputs: the whole batch; read on the rank holding stage 0.
            targets: the whole batch's targets; read on the rank holding the last stage.
            weights: each micro-batch's weight in the step's loss (read on the last stage's
                rank); None for its share of the rows, which makes the step's loss the mean
                over the batch when ``loss_fn`` is a mean over a micro-batch's rows. A loss
                that averages over the tokens in the loss (cross-entropy ignoring -100) gets
                the batch's token mean with weights ``tokens_j / tokens``.

        Returns:
            The weighted loss (by default the mean over the batch) on the rank holding the
            last stage, else None.

        Raises:
            RuntimeFailure: an action failed here (message: rank, action, error), another rank
                failed (:class:`PeerFailure`), or a wait ran past the timeout. After a failure
                the pipeline and its process group are in an unknown state: end the process
                (the launcher and torchrun do) rather than calling ``step`` again.
        """
        run = _Step(self, inputs, targets, weights)
        return run.execute()

    def post_failure(self, text: str) -> None:
        """Tell the other ranks this rank failed (done by :meth:`step` on its own errors)."""
        self._board.post(text)


class _Step:
    """The state of one step on one rank; discarded at its end."""

    def __init__(
        self, pipe: Pipeline, inputs: torch.Tensor | None, targets: torch.Tensor | None,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.pipe = pipe
        schedule = pipe.schedule
        self.m = schedule.num_microbatches
        self.last = schedule.num_stages - 1
        self.inputs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.weights: list[float] = []
        if 0 in pipe.stages:
            if inputs is None:
                raise ConfigError(f"rank {pipe.rank} holds stage 0: pass the inputs to step()")
            self.inputs = split_batch(inputs.to(pipe.device), self.m, "inputs")
        if self.last in pipe.stages:
            if targets is None:
                raise ConfigError(
                    f"rank {pipe.rank} holds the last stage: pass the targets to step()"
                )
            self.targets = split_batch(targets.to(pipe.device), self.m, "targets")
            self.weights = loss_weights(self.targets) if weights is None else list(weights)
            if len(self.weights) != self.m:
                raise ConfigError(
                    f"{len(self.weights)} loss weights for {self.m} micro-batches: give one "
                    "weight per micro-batch"
                )
        self.stage_inputs: dict[tuple[int, int], torch.Tensor | None] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.deferred: dict[tuple[int, int], WeightGrad] = {}
        self.local: dict[tuple[int, int, int], torch.Tensor] = {}
        self.loss: torch.Tensor | None = None

    def execute(self) -> torch.Tensor | None:
        pipe = self.pipe
        sizes = (pipe.schedule.num_stages, self.m)
        pipe.events = []
        pipe.saved_bytes = {}
        self.wire = Wire(
            pipe._plan.order, pipe.rank, pipe._groups, sizes, pipe.timeout,
            pipe._sent_shapes, pipe._received_shapes, pipe._board,
        )
        sync = pipe.device.type == "cuda"
        action = None
        try:
            for index, action in enumerate(pipe.schedule.actions[pipe.rank]):
                if pipe.on_action is not None:
                    pipe.on_action(action)
                received = self.fetch(action)  # waiting for a neighbour is not compute time
                start = time.perf_counter()
                result = self.run(action, received)
                message = pipe._plan.sends[index]
                if message is not None:
                    assert result is not None
                    self.wire.send(result, message)
                elif result is not None:
                    self.local[(_kind(action), action.stage, action.microbatch)] = result
                if sync:
                    torch.cuda.synchronize(pipe.device)
                pipe.events.append(
                    Event(pipe.rank, action.stage, action.op, action.microbatch, start,
                          time.perf_counter())
                )
            action = None
            deadline = time.monotonic() + pipe.timeout
            self.wire.close(deadline)
            pipe._ties.reduce_grads()
        except PeerFailure as err:
            where = "at the end of the step" if action is None else f"at {describe(action)}"
            raise PeerFailure(f"rank {pipe.rank} {where}: {err}") from None
        except Exception as err:
            where = "at the end of the step" if action is None else f"at {describe(action)}"
            text = f"rank {pipe.rank} failed {where}: {type(err).__name__}: {err}"
            text = " ".join(text.split())
            pipe.post_failure(text)
            kind = type(err) if isinstance(err, RuntimeFailure) else RuntimeFailure
            raise kind(text) from err
        assert not self.outputs, "schedule left work undone"
        assert not self.deferred, "schedule left work undone"
        return self.loss

    # --- the ops -------------------------------------------------------------------------------

    def fetch(self, action: Action) -> torch.Tensor | None:
        """The tensor ``action`` needs from a neighbour stage (waiting for it), if any."""
        stage, j = action.stage, action.microbatch
        if action.op is Op.F and stage > 0:
            return self.receive(Kind.ACTIVATION, stage - 1, j)
        if action.op.is_backward and stage < self.last:
            return self.receive(Kind.GRADIENT, stage + 1, j)
        return None

    def run(self, action: Action, received: torch.Tensor | None) -> torch.Tensor | None:
        """Run one action; return the tensor it hands to a neighbour stage, if any."""
        if action.op is Op.F:
            return self.forward(action.stage, action.microbatch, received)
        if action.op is Op.W:
            self.deferred.pop((action.stage, action.microbatch)).run()
            return None
        split = action.op is Op.I
        return self.backward(action.stage, action.microbatch, received, split)

    def receive(self, kind: Kind, stage: int, j: int) -> torch.Tensor:
        """The tensor ``stage`` produced for micro-batch ``j``, local or from another rank."""
        key = (int(kind), stage, j)
        if key in self.local:
            return self.local.pop(key)
        what = ("activation" if kind is Kind.ACTIVATION else "gradient") + (
            f" of stage {stage}, micro-batch {j} from rank {self.pipe.schedule.rank_of(stage)}"
        )
        deadline = time.monotonic() + self.pipe.timeout
        return self.wire.take(key, what, deadline).to(self.pipe.device)

    def forward(self, stage: int, j: int, received: torch.Tensor | None) -> torch.Tensor | None:
        pipe = self.pipe
        if received is None:
            x: torch.Tensor | None = self.inputs[j]
            leaf = None
        else:
            x = leaf = received.detach().requires_grad_(received.is_floating_point())
        module = pipe.stages[stage]
        if pipe.count_saved:
            with SavedBytes(module.parameters()) as saved:
                out = module(x)
            pipe.saved_bytes[(stage, j)] = saved.nbytes
        else:
            out = module(x)
        if not isinstance(out, torch.Tensor):
            raise ConfigError(
                f"stage {stage} returned {type(out).__name__}; a stage must return one tensor"
            )
        self.stage_inputs[(stage, j)] = leaf
        if stage == self.last:
            assert pipe.loss_fn is not None
            loss = pipe.loss_fn(out, self.targets[j])
            if pipe.check_finite and not bool(torch.isfinite(loss.detach()).all()):
                raise NonFiniteLoss(f"the loss of micro-batch {j} is {loss.item()}")
            scaled = loss * self.weights[j]
            self.loss = scaled.detach() if self.loss is None else self.loss + scaled.detach()
            self.outputs[(stage, j)] = scaled
            return None
        self.outputs[(stage, j)] = out
        return out.detach()

    def backward(
        self, stage: int, j: int, grad_out: torch.Tensor | None, split: bool
    ) -> torch.Tensor | None:
        out = self.outputs.pop((stage, j))
        leaf = self.stage_inputs.pop((stage, j))
        if not out.requires_grad:
            # Nothing to differentiate (a frozen stage fed with data): no weight work either.
            if split:
                self.deferred[(stage, j)] = WeightGrad()
            return torch.zeros_like(leaf) if leaf is not None and stage > 0 else None
        if split:
            grad_in, weight = backward_input(out, grad_out, leaf, self.pipe._params[stage])
            self.deferred[(stage, j)] = weight
        else:
            torch.autograd.backward(out, grad_out)
            grad_in = None
            if leaf is not None:
                grad_in = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        return grad_in if stage > 0 else None


def _kind(action: Action) -> Kind:
    return Kind.ACTIVATION if action.op is Op.F else Kind.GRADIENT


def _groups(group: dist.ProcessGroup | None, device: torch.device) -> Groups:
    """The data and meta groups of a pipeline on ``group`` with stages on ``device``."""
    backend = dist.get_backend(group)
    meta = group
    if backend != "gloo":
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        meta = dist.new_group(ranks=ranks, backend="gloo")
    if backend == "nccl" and device.type == "cuda":
        return Groups(data=group, meta=meta, wire=device, native=True)
    # gloo carries host tensors: stage them through host memory (a no-op on CPU).
    return Groups(data=meta, meta=meta, wire=torch.device("cpu"), native=False)


def _neighbours(schedule: Schedule) -> list[tuple[int, int]]:
    """Every pair of ranks that hold consecutive stages, as (lower rank, higher rank)."""
    pairs = set()
    for stage in range(schedule.num_stages - 1):
        a, b = schedule.rank_of(stage), schedule.rank_of(stage + 1)
        if a != b:
            pairs.add((min(a, b), max(a, b)))
    return sorted(pairs)


def _device_of(modules: Iterable[nn.Module]) -> torch.device:
    """The device of the first parameter or buffer of the stages (cpu if none)."""
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            return torch.device(tensor.device)
    return torch.device("cpu")
