"""The optimizer as large models are trained: weight-decay groups, a learning-rate schedule,
gradient accumulation across steps, and the checks of these settings before launch.

Clipping by the global gradient norm lives in :mod:`stagewise.train.grad_norm`.

Where the trainer calls what, each optimizer step (``k`` accumulation steps)::

    optimizer = torch.optim.AdamW(param_groups(model.stages, weight_decay), lr=lr)
    accumulation = GradAccumulation(model.stages, k)
    for micro_step in range(k):
        accumulation.before_step()        # sets the gradients summed so far aside
        pipe.step(inputs, targets)        # fresh gradients (tied copies summed inside)
        <the dp reduction>                # reducer.finish() / average_gradients(...)
    accumulation.finish()                 # gradients = the mean of the k steps' gradients
    norm = clip_grad_norm(model.stages, clip, groups, ties=model.ties)
    apply_lr(optimizer, lr_at(step, lr=lr, schedule=..., warmup_steps=..., total_steps=...))
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from stagewise.errors import ConfigError

__all__ = [
    "SCHEDULES",
    "GradAccumulation",
    "apply_lr",
    "check_optim_args",
    "lr_at",
    "param_groups",
    "scale_grads",
    "unique_parameters",
]

SCHEDULES = ("constant", "cosine", "linear")
"""Learning-rate schedules :func:`lr_at` knows (each after a linear warm-up)."""


def unique_parameters(stages: Mapping[int, nn.Module]) -> list[nn.Parameter]:
    """Every trainable parameter of ``stages``, each object once, in stage order.

    A Parameter used by two stages on one rank (a tie inside one process) is listed once.
    """
    seen: dict[int, nn.Parameter] = {}
    for stage in sorted(stages):
        for param in stages[stage].parameters():
            if param.requires_grad:
                seen.setdefault(id(param), param)
    return list(seen.values())


def param_groups(stages: Mapping[int, nn.Module], weight_decay: float) -> list[dict[str, object]]:
    """The optimizer's parameter groups: weight decay on matrices, none on vectors.

    As Megatron-LM, Hugging Face's Trainer and nanoGPT: parameters of 2 or more dimensions
    (linear weights, embedding tables, tied heads included) decay; 1-D parameters (biases,
    LayerNorm/RMSNorm weights) do not. Frozen parameters (``requires_grad=False``) are left
    out; a parameter shared by two stages on this rank appears once. Empty groups are dropped.

    Args:
        stages: this rank's ``{stage: module}`` (``RankModel.stages``).
        weight_decay: decoupled weight decay of the decayed group (AdamW's ``weight_decay``).

    Returns:
        ``[{"params": [...], "weight_decay": weight_decay}, {"params": [...],
        "weight_decay": 0.0}]``, ready for ``torch.optim.AdamW``.

    Example:
        >>> groups = param_groups({0: nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))}, 0.1)
        >>> [(len(g["params"]), g["weight_decay"]) for g in groups]
        [(1, 0.1), (3, 0.0)]
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in unique_parameters(stages):
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups: list[dict[str, object]] = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def lr_at(
    step: int,
    *,
    lr: float,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.1,
) -> float:
    """The learning rate of optimizer step ``step`` (counted from 0).

    Warm-up: steps ``0 .. warmup_steps - 1`` rise linearly, ``lr * (step + 1) /
    (warmup_steps + 1)``, so no step trains at 0 and step ``warmup_steps`` is the first at
    the peak ``lr`` (as torchtitan). Then, from step ``warmup_steps`` (the peak) to the last
    step ``total_steps - 1`` (the floor ``lr * min_lr_ratio``), with ``progress`` going
    linearly from 0 to 1:

    - ``constant``: ``lr``;
    - ``linear``: ``floor + (lr - floor) * (1 - progress)``;
    - ``cosine``: ``floor + (lr - floor) * (1 + cos(pi * progress)) / 2``.

    Steps past the end keep the floor. The default floor of 10 % of the peak is Chinchilla's
    and Llama's; pass ``min_lr_ratio=0.0`` to decay to zero.

    Raises:
        ConfigError: as :func:`check_optim_args`.

    Example:
        >>> [round(lr_at(s, lr=1.0, schedule="linear", warmup_steps=1, total_steps=4,
        ...              min_lr_ratio=0.0), 3) for s in range(4)]
        [0.5, 1.0, 0.5, 0.0]
    """
    _check_schedule(lr, schedule, warmup_steps, total_steps, min_lr_ratio)
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    floor = lr * min_lr_ratio
    if schedule == "linear":
        return floor + (lr - floor) * (1.0 - progress)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate to ``lr`` (call before ``optimizer.step``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def check_optim_args(
    *,
    lr: float,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int = 1,
    min_lr_ratio: float = 0.1,
    clip_grad: float | None = None,
    weight_decay: float = 0.0,
    accumulation_steps: int = 1,
) -> None:
    """Check the optimizer's settings before any process starts; one line naming the fix.

    Args:
        lr: peak learning rate (> 0).
        schedule: one of :data:`SCHEDULES`.
        warmup_steps: warm-up steps, ``0 <= warmup_steps < total_steps``.
        total_steps: optimizer steps of the whole run (``--steps``).
        min_lr_ratio: the decay's floor as a fraction of ``lr``, in ``[0, 1]``.
        clip_grad: the global-norm limit (> 0), or None for no clipping.
        weight_decay: AdamW's decoupled weight decay (>= 0).
        accumulation_steps: pipeline steps per optimizer step (>= 1).

    Raises:
        ConfigError: any setting out of range.
    """
    _check_schedule(lr, schedule, warmup_steps, total_steps, min_lr_ratio)
    if clip_grad is not None and not (clip_grad > 0 and math.isfinite(clip_grad)):
        raise ConfigError(
            f"--clip-grad {clip_grad}: the gradient-norm limit must be a positive number "
            "(1.0 is usual); leave it out for no clipping"
        )
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ConfigError(f"weight decay {weight_decay} must be >= 0 (0.1 is usual)")
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or \
            accumulation_steps < 1:
        raise ConfigError(
            f"gradient accumulation over {accumulation_steps!r} steps: give a whole number "
            ">= 1 (1: no accumulation)"
        )


def _check_schedule(
    lr: float, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> None:
    """The learning-rate settings' checks (see :func:`check_optim_args`)."""
    if schedule not in SCHEDULES:
        raise ConfigError(
            f"--lr-schedule {schedule!r} is not a schedule: choose one of {', '.join(SCHEDULES)}"
        )
    if not lr > 0:  # NaN fails too; inf is a (diverging) positive rate, used to test --check-finite
        raise ConfigError(f"--lr {lr}: the learning rate must be a positive number")
    if total_steps < 1:
        raise ConfigError(f"--steps {total_steps}: a run needs at least 1 step")
    if warmup_steps < 0:
        raise ConfigError(f"--warmup-steps {warmup_steps} must be >= 0 (0: no warm-up)")
    if warmup_steps >= total_steps:
        raise ConfigError(
            f"--warmup-steps {warmup_steps} is not shorter than the run's {total_steps} steps: "
            f"use at most {total_steps - 1} warm-up steps or train for more steps"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(
            f"minimum learning-rate ratio {min_lr_ratio} must lie in [0, 1] (a fraction of "
            "--lr; 0.1 is usual)"
        )


class GradAccumulation:
    """Sum the gradients of ``num_steps`` pipeline steps into one optimizer step, as a mean.

    Each ``Pipeline.step`` averages over its micro-batches; ``num_steps`` of them before one
    optimizer step must give the mean over all of them. The gradients summed so far are set
    aside before each pipeline step (not left in ``.grad``), because the tied-weight exchange
    at the end of a step sums the copies' whole ``.grad``: left there, earlier steps' sums would
    be counted again. So each step's gradients are complete (ties summed, dp reduced) on their
    own, and :meth:`finish` adds them up and divides by ``num_steps``. It costs one
    gradient-sized buffer; dp reductions run every pipeline step.

    Args:
        stages: this rank's ``{stage: module}``.
        num_steps: pipeline steps per optimizer step (1: does nothing).

    Raises:
        ConfigError: ``num_steps`` is below 1.
    """

    def __init__(self, stages: Mapping[int, nn.Module], num_steps: int) -> None:
        check_optim_args(lr=1.0, accumulation_steps=num_steps)
        self.num_steps = num_steps
        self._params = unique_parameters(stages)
        self._sums: dict[int, torch.Tensor] = {}

    def before_step(self) -> None:
        """Move the gradients into the running sums, leaving ``.grad`` None (before each
        ``Pipeline.step``)."""
        if self.num_steps == 1:
            return
        for param in self._params:
            grad = param.grad
            if grad is None:
                continue
            total = self._sums.get(id(param))
            if total is None:
                self._sums[id(param)] = grad
            else:
                total.add_(grad)
            param.grad = None

    def finish(self) -> None:
        """Make each ``.grad`` the mean of the accumulated steps' gradients (after the last
        step's dp reduction, before clipping and ``optimizer.step``)."""
        if self.num_steps == 1:
            return
        self.before_step()
        for param in self._params:
            total = self._sums.pop(id(param), None)
            if total is not None:
                param.grad = total.div_(self.num_steps)


def scale_grads(params: Iterable[nn.Parameter], factor: float) -> None:
    """Multiply every gradient of ``params`` by ``factor`` in place (a DTensor's too)."""
    with torch.no_grad():
        for param in params:
            if param.grad is not None:
                param.grad.mul_(factor)
