"""The training loop of one rank: resume, run the steps, evaluate, save checkpoints, show
progress."""

from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from stagewise.errors import ConfigError
from stagewise.runtime.checkpoint.folders import resume_checkpoint
from stagewise.runtime.checkpoint.state import load_checkpoint, save_checkpoint
from stagewise.runtime.engine.launch import RankContext
from stagewise.runtime.engine.pipeline import Pipeline
from stagewise.runtime.parallel.mesh import (
    MeshGroups,
    OverlappedAverage,
    average_gradients,
    average_loss,
)
from stagewise.train.batches import Batches
from stagewise.train.grad_norm import clip_grad_norm, global_grad_norm
from stagewise.train.job import Job
from stagewise.train.metrics import peak_memory_bytes
from stagewise.train.optim import GradAccumulation, apply_lr, lr_at
from stagewise.train.results import RankResult, StepRecord
from stagewise.train.stages import RankModel
from stagewise.train.telemetry import Telemetry

__all__ = ["Trainer", "resume"]


@dataclass
class Trainer:
    """One rank's pipeline, optimizer, data and data-parallel reduction, stepped by
    :meth:`run`."""

    job: Job
    model: RankModel
    pipe: Pipeline
    optimizer: torch.optim.Optimizer
    layers: dict[int, torch.nn.Module]
    groups: MeshGroups | None
    reducer: OverlappedAverage | None
    batches: Batches
    accumulation: GradAccumulation
    telemetry: Telemetry
    context: RankContext | None = None  # where this rank reports what it does (heartbeat)

    def run(self, result: RankResult, first_step: int) -> None:
        """Train from ``first_step`` to the last step, appending to ``result``."""
        config = self.job.config
        steps, every = config.training.steps, config.data.eval_every
        bar = _progress_bar(steps - first_step) if self._shows(result) else None
        tokens = self.telemetry.tokens
        for step in range(first_step, steps):
            self._report(None, step)
            start = time.perf_counter()
            loss, lr, norm = self.step(step)
            seconds = time.perf_counter() - start
            self.telemetry.write(step + 1, loss, lr, norm, seconds)
            result.step_seconds.append(seconds)
            if step > first_step:
                result.records.append(StepRecord(tuple(self.pipe.events),
                                                 dict(self.pipe.saved_bytes)))
            if loss is not None:
                result.losses.append(loss)
            self._save(step + 1, result.losses if loss is not None else None)
            if loss is not None and bar is not None:
                _show(bar, step, loss, seconds, tokens)
            if self.batches.eval is not None and (
                    step + 1 == steps or (every and (step + 1) % every == 0)):
                self._evaluate(step + 1, result, bar)
        if bar is not None:
            bar.close()
        self._report("the final gather")
        self.telemetry.close()
        result.peak_memory_bytes = peak_memory_bytes(config.launch.device)

    def step(self, step: int) -> tuple[float | None, float, float | None]:
        """One optimizer step over ``grad_accum`` batches: the mean loss on last-stage ranks
        (None elsewhere), the learning rate, and the global gradient norm before clipping
        (None unless clipping or metrics ask for it)."""
        training = self.job.config.training
        losses = []
        for part in range(training.grad_accum):
            self.accumulation.before_step()
            inputs, targets, weights = self.batches.step(step * training.grad_accum + part)
            loss = self._forward_backward(inputs, targets, weights)
            if loss is not None:
                losses.append(loss)
        self.accumulation.finish()
        self._report("the optimizer step")
        norm = self._clip()
        lr = lr_at(step, lr=training.lr, schedule=training.lr_schedule,
                   warmup_steps=training.warmup_steps, total_steps=training.steps)
        apply_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return (sum(losses) / len(losses) if losses else None), lr, norm

    def _clip(self) -> float | None:
        """Clip to ``clip_grad`` by the global norm over every rank (a collective every rank
        makes); the norm before clipping, or None when neither clipping nor metrics ask."""
        clip = self.job.config.training.clip_grad
        stages, ties = self.model.stages, self.model.ties
        if clip is not None:
            return clip_grad_norm(stages, clip, self.groups, ties=ties)
        if self.telemetry.wanted:
            return global_grad_norm(stages, self.groups, ties=ties)
        return None

    def _forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor,
                          weights: list[float] | None) -> float | None:
        """The pipeline's step and the data-parallel reduction: the replicas' mean loss on
        last-stage ranks, and every gradient averaged over the replicas."""
        groups = self.groups
        loss = self.pipe.step(inputs, targets, weights=weights)
        if groups is not None:
            if self.reducer is not None:
                self.reducer.finish()
            elif not groups.spec.dp_shard:
                average_gradients(self.model.stages.values(), groups.dp_group)
            if loss is not None:
                loss = average_loss(loss, groups.dp_group)
        return None if loss is None else float(loss)

    def _evaluate(self, step: int, result: RankResult, bar: Any) -> None:
        """The mean loss over every in-loss token of the eval data, after ``step`` steps.

        The pipeline runs its schedule (forward and backward) on each eval batch and the
        gradients are thrown away: the schedule is the only program the ranks share, and it
        always ends with the backward passes.
        """
        self._report("the evaluation")
        total = weighted = 0.0
        for inputs, targets, weights, count in self.batches.evaluation():
            loss = self._forward_backward(inputs, targets, weights)
            self.optimizer.zero_grad(set_to_none=True)
            if loss is not None:
                weighted += loss * count
                total += count
        if total:
            mean = weighted / total
            entry = {"step": float(step), "loss": mean, "perplexity": math.exp(min(mean, 700))}
            result.evals.append(entry)
            if bar is not None:
                bar.write(f"eval after step {step}: loss {mean:.4f}, perplexity "
                          f"{entry['perplexity']:.2f}")

    def _save(self, done: int, losses: list[float] | None) -> None:
        checkpoint, steps = self.job.config.checkpoint, self.job.config.training.steps
        due = checkpoint.save_every and done % checkpoint.save_every == 0
        if not due and not (checkpoint.export_hf is not None and done == steps):
            return
        assert checkpoint.dir is not None
        extra: dict[str, Any] | None = None if losses is None else {"losses": losses}
        self._report("the checkpoint save")
        position = self.batches.position(done * self.job.config.training.grad_accum)
        if extra is not None and position is not None:
            extra["data"] = position  # where the next step's batch starts
        save_checkpoint(checkpoint.dir, done, self.layers, self.optimizer, extra=extra,
                        keep=checkpoint.keep)

    def _report(self, phase: str | None, step: int | None = None) -> None:
        if self.context is not None:
            self.context.report_phase(phase, step)

    def _shows(self, result: RankResult) -> bool:
        last = self.job.schedule.num_stages - 1 in self.model.stages
        return self.job.progress and last and result.first_replica


def resume(job: Job, layers: dict[int, torch.nn.Module],
           optimizer: torch.optim.Optimizer) -> tuple[int, list[float]]:
    """The step to start from and the losses before it: 0 and none unless resuming.

    Raises:
        ConfigError: the checkpoint's data position was written with another global batch
            (the run would not continue with the next samples).
    """
    checkpoint = job.config.checkpoint
    if not checkpoint.resume:
        return 0, []
    assert checkpoint.dir is not None
    # prepare() checked every file of this checkpoint before launch.
    path = resume_checkpoint(checkpoint.dir, checkpoint.resume_from, check=False)
    state = load_checkpoint(path, layers, optimizer)
    for group in optimizer.param_groups:
        group["lr"] = job.config.training.lr  # this run's lr, not the checkpoint's
    data = state["extra"].get("data")
    rows = job.config.batch.global_batch
    if data is not None and data.get("global_batch", rows) != rows:
        raise ConfigError(
            f"the checkpoint {str(path)!r} was trained with a global batch of "
            f"{data['global_batch']} sequences; resume with --global-batch "
            f"{data['global_batch']} to continue the data where it stopped"
        )
    # prepare() checked before launch that at least 2 steps are left after this one.
    return state["step"], list(state["extra"].get("losses", []))


def _show(bar: Any, step: int, loss: float, seconds: float, tokens: int) -> None:
    bar.set_postfix_str(f"loss {loss:.3f}  {seconds * 1e3:.0f} ms  {tokens / seconds:,.0f} tok/s")
    bar.write(f"step {step + 1:>4}  loss {loss:7.4f}  step {seconds:.3f} s  "
              f"{tokens / seconds:9,.0f} tokens/s")
    bar.update(1)


def _progress_bar(steps: int) -> Any:
    from tqdm import tqdm

    # tqdm's default lock includes a multiprocessing semaphore that a rank, ending with
    # os._exit, would leave behind (the launcher's resource tracker then warns about a leak).
    tqdm.set_lock(threading.RLock())
    # The bar only on a terminal (disable=None); the per-step lines always, on stdout.
    return tqdm(total=steps, desc="training", unit="step", file=sys.stderr, leave=False,
                disable=None)
