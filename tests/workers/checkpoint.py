"""Rank functions for the checkpoint tests: train, save, die, resume, under any layout.

:func:`train_run` trains the tiny GPT with AdamW under a :class:`Run` (pipeline ranks, chunks,
partition, data-parallel replicas), saving every few steps, optionally resuming from the newest
complete checkpoint first, and optionally killing one rank after a given checkpoint or in the
middle of writing one. Step ``s``'s batch is a function of the seed and ``s`` alone, so a
resumed run sees the data an uninterrupted one would. Each rank returns its losses and a
snapshot of its parameters and AdamW state keyed by model layer (``"<layer>.<name>"``), read
straight from the modules and the optimizer, not through the checkpoint code.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

from stagewise.runtime.checkpoint import state as checkpoint
from stagewise.runtime.checkpoint.state import (
    latest_checkpoint,
    load_checkpoint,
    rank_layers,
    save_checkpoint,
)
from stagewise.runtime.engine.launch import RankContext
from stagewise.runtime.engine.partition import partition, stages_for_rank
from stagewise.runtime.engine.pipeline import Pipeline
from stagewise.runtime.models.tiny_gpt import GPTConfig, gpt_layers, lm_loss, make_batch, tp_plan
from stagewise.runtime.parallel.mesh import (
    Mesh,
    average_gradients,
    average_loss,
    build_mesh,
    replica_slice,
)
from stagewise.schedules.registry import build

__all__ = ["CONFIG", "Run", "batch", "snapshot", "train_run"]

CONFIG = GPTConfig(vocab=16, seq_len=8, dim=16, heads=2, layers=4)  # 6 layers with embedding, head
BATCH = 8
MICROBATCHES = 4
LR = 1e-2


@dataclass(frozen=True)
class Run:
    """One training run of :func:`train_run`.

    Attributes:
        steps: train until this many optimizer steps are done.
        pp: pipeline ranks.
        dp: data-parallel replicas (a mesh when > 1).
        tp: tensor-parallel ranks per pipeline rank (a mesh when > 1; blocks sharded, their
            weights ``DTensor`` parameters); ``pp * dp * tp`` processes in all.
        schedule: schedule name.
        chunks: stages per rank (interleaved schedules).
        method: partition method.
        folder: checkpoint folder (None: no checkpoints).
        save_every: save after every this many steps (0: never).
        resume: load the newest complete checkpoint first (required to exist).
        die_after: this step's checkpoint written, rank ``die_rank`` kills itself.
        die_in_save: rank ``die_rank`` kills itself while this step's checkpoint is written
            (its data written, before the completion barrier).
        die_rank: the rank that dies.
        keep: keep only the newest this many checkpoints (None: all).
        seed: data seed.
    """

    steps: int
    pp: int = 2
    dp: int = 1
    tp: int = 1
    schedule: str = "1f1b"
    chunks: int = 1
    method: str = "even"
    folder: str | None = None
    save_every: int = 0
    resume: bool = False
    die_after: int | None = None
    die_in_save: int | None = None
    die_rank: int = 1
    keep: int | None = None
    seed: int = 0


def batch(seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s global batch: a function of ``seed`` and ``step`` alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return make_batch(CONFIG, BATCH, generator)


def snapshot(layers: dict[int, nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Copies of every parameter and its AdamW state, keyed ``"<layer>.<name>[.<state>]"``;
    a ``DTensor`` gathered whole (a collective over its mesh: every tp rank calls this)."""
    params: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for index, layer in sorted(layers.items()):
        for name, param in layer.named_parameters():
            params[f"{index}.{name}"] = _whole(param.detach()).clone()
            for key, value in optimizer.state.get(param, {}).items():
                state[f"{index}.{name}.{key}"] = _whole(torch.as_tensor(value)).clone()
    return {"params": params, "optim": state}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def train_run(context: RankContext, run: Run) -> dict[str, Any]:
    """Train under ``run`` on this rank; return its losses (by step) and snapshots.

    Returns:
        ``{"start": first step trained, "losses": {step: loss} (last stage, replica 0),
        "loaded": snapshot after the load (resume only), "final": snapshot at the end,
        "extra": the loaded extra}``.
    """
    spec = Mesh(pp=run.pp, dp=run.dp, tp=run.tp)
    groups = build_mesh(spec) if spec.world_size > run.pp else None
    pp_rank = groups.pp_rank if groups is not None else context.rank
    dp_rank = groups.dp_rank if groups is not None else 0
    schedule = build(run.schedule, num_ranks=run.pp, num_microbatches=MICROBATCHES,
                     num_chunks=run.chunks)
    stages = partition(gpt_layers(CONFIG, seed=1), schedule.num_stages, run.method)
    sizes = [len(stage) for stage in stages]
    mine = stages_for_rank(schedule, stages, pp_rank)
    if groups is not None and run.tp > 1:
        from stagewise.runtime.parallel.tensor_parallel import apply_tensor_parallel

        for module in mine.values():
            apply_tensor_parallel(module, groups.tp_mesh, tp_plan)
    layers = rank_layers(mine, sizes)
    pipe = Pipeline(schedule, mine, lm_loss, group=groups.pp_group if groups else None,
                    timeout=60.0, store=context.store)
    optimizer = torch.optim.AdamW([p for m in mine.values() for p in m.parameters()], lr=LR)
    result: dict[str, Any] = {"start": 0, "losses": {}, "loaded": None, "extra": None}
    # Every loss so far (those of the checkpoint's steps too), on the rank that records them.
    records = schedule.num_stages - 1 in mine and dp_rank == 0
    history: dict[int, float] = {}
    if run.resume:
        assert run.folder is not None
        path = latest_checkpoint(run.folder, required=True)
        assert path is not None
        info = load_checkpoint(path, layers, optimizer)
        result.update(start=info["step"], extra=info["extra"], loaded=snapshot(layers, optimizer))
        history.update(info["extra"]["losses"])
    dies = run.die_in_save is not None and context.rank == run.die_rank
    with _dying_write(run) if dies else contextlib.nullcontext():
        for step in range(result["start"], run.steps):
            inputs, targets = batch(run.seed, step)
            if groups is not None:
                inputs = replica_slice(inputs, run.dp, dp_rank)
                targets = replica_slice(targets, run.dp, dp_rank)
            loss = pipe.step(inputs, targets)
            if groups is not None:
                average_gradients(mine.values(), groups.dp_group)
                if loss is not None:
                    loss = average_loss(loss, groups.dp_group)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if loss is not None and records:
                result["losses"][step + 1] = history[step + 1] = float(loss)
            done = step + 1
            if run.folder is not None and run.save_every and done % run.save_every == 0:
                layout = f"pp={run.pp},dp={run.dp},tp={run.tp},v={run.chunks}"
                extra = {"seed": run.seed, "layout": layout, "losses": history} if records else None
                save_checkpoint(run.folder, done, layers, optimizer, extra=extra, keep=run.keep)
                if done == run.die_after and context.rank == run.die_rank:
                    os.kill(os.getpid(), signal.SIGKILL)
    result["final"] = snapshot(layers, optimizer)
    return result


def _dying_write(run: Run) -> Any:
    """A patch of the checkpoint's writer that kills this process after writing its share of
    step ``run.die_in_save``'s checkpoint (before the barrier that completes it)."""
    write = checkpoint._write_state

    def write_then_die(state: dict[str, Any], folder: Path) -> None:
        write(state, folder)
        if folder.name == f"step-{run.die_in_save:08d}.partial":
            os.kill(os.getpid(), signal.SIGKILL)

    return mock.patch.object(checkpoint, "_write_state", write_then_die)
