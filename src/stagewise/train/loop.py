"""The training loop of one rank: resume, run the steps, save checkpoints, show progress."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from stagewise.runtime.checkpoint.state import latest_checkpoint, load_checkpoint, save_checkpoint
from stagewise.runtime.engine.pipeline import Pipeline
from stagewise.runtime.parallel.mesh import (
    MeshGroups,
    OverlappedAverage,
    average_gradients,
    average_loss,
    replica_slice,
)
from stagewise.train.job import Job
from stagewise.train.results import RankResult, StepRecord
from stagewise.train.stages import RankModel, step_batch

__all__ = ["Trainer", "resume"]


@dataclass
class Trainer:
    """One rank's pipeline, optimizer and data-parallel reduction, stepped by :meth:`run`."""

    job: Job
    model: RankModel
    pipe: Pipeline
    optimizer: torch.optim.Optimizer
    layers: dict[int, torch.nn.Module]
    groups: MeshGroups | None
    reducer: OverlappedAverage | None

    def run(self, result: RankResult, first_step: int) -> None:
        """Train from ``first_step`` to the last step, appending to ``result``."""
        config = self.job.config
        bar = _progress_bar(config.training.steps - first_step) if self._shows(result) else None
        tokens = config.batch.global_batch * self.model.parts.seq_len
        for step in range(first_step, config.training.steps):
            start = time.perf_counter()
            loss = self.step(step, result.dp_rank)
            seconds = time.perf_counter() - start
            result.step_seconds.append(seconds)
            if step > first_step:
                result.records.append(StepRecord(tuple(self.pipe.events),
                                                 dict(self.pipe.saved_bytes)))
            if loss is not None:
                result.losses.append(loss)
            self._save(step + 1, result.losses if loss is not None else None)
            if loss is not None and bar is not None:
                _show(bar, step, loss, seconds, tokens)
        if bar is not None:
            bar.close()

    def step(self, step: int, dp_rank: int) -> float | None:
        """One optimizer step; the mean loss on last-stage ranks, None elsewhere."""
        config, groups = self.job.config, self.groups
        inputs, targets = step_batch(self.model.parts, config.training.seed, step,
                                     config.batch.global_batch)
        if groups is not None:
            inputs = replica_slice(inputs, config.mesh.dp, dp_rank)
            targets = replica_slice(targets, config.mesh.dp, dp_rank)
        loss = self.pipe.step(inputs, targets)
        if groups is not None:
            if self.reducer is not None:
                self.reducer.finish()
            elif not groups.spec.dp_shard:
                average_gradients(self.model.stages.values(), groups.dp_group)
            if loss is not None:
                loss = average_loss(loss, groups.dp_group)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return None if loss is None else float(loss)

    def _save(self, done: int, losses: list[float] | None) -> None:
        checkpoint = self.job.config.checkpoint
        if checkpoint.save_every and done % checkpoint.save_every == 0:
            assert checkpoint.dir is not None
            save_checkpoint(checkpoint.dir, done, self.layers, self.optimizer,
                            extra=None if losses is None else {"losses": losses},
                            keep=checkpoint.keep)

    def _shows(self, result: RankResult) -> bool:
        last = self.job.schedule.num_stages - 1 in self.model.stages
        return self.job.progress and last and result.first_replica


def resume(job: Job, layers: dict[int, torch.nn.Module],
           optimizer: torch.optim.Optimizer) -> tuple[int, list[float]]:
    """The step to start from and the losses before it: 0 and none unless resuming."""
    checkpoint = job.config.checkpoint
    if not checkpoint.resume:
        return 0, []
    assert checkpoint.dir is not None
    path = latest_checkpoint(checkpoint.dir, required=True)
    assert path is not None
    state = load_checkpoint(path, layers, optimizer)
    for group in optimizer.param_groups:
        group["lr"] = job.config.training.lr  # this run's lr, not the checkpoint's
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
