"""Rank functions for the runtime's multi-process tests (importable by spawned ranks).

The tests put this folder on ``sys.path``; spawned ranks inherit it and import this module.
"""

from __future__ import annotations

import os
import signal
import time

import torch
from torch import nn

from stagewise.mesh import Mesh
from stagewise.runtime import Pipeline, RankContext, partition, stages_for_rank
from stagewise.runtime.models.tiny_gpt import GPTConfig, gpt_layers, lm_loss, make_batch
from stagewise.schedules import build

CONFIG = GPTConfig(vocab=16, seq_len=8, dim=16, heads=2, layers=2)


class Fault(nn.Module):
    """Identity until step ``at_step``, micro-batch 1: then raise, return NaN, hang or die."""

    def __init__(self, kind: str, at_step: int) -> None:
        super().__init__()
        self.kind, self.at_step, self.calls = kind, at_step, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls != 4 * self.at_step + 2:  # 4 micro-batches per step
            return x
        if self.kind == "raise":
            raise ValueError("injected failure in a layer")
        if self.kind == "nan":
            return x * float("nan")
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "hang":
            time.sleep(60)
        return x


def faulty_rank(context: RankContext, kind: str, faulty: int, timeout: float) -> int:
    """Train 3 steps of 1F1B on the tiny GPT; rank ``faulty`` misbehaves in step 1."""
    schedule = build("1f1b", num_ranks=context.world_size, num_microbatches=4)
    stages = partition(gpt_layers(CONFIG), schedule.num_stages)
    if context.rank == faulty:
        stages[faulty].append(Fault(kind, at_step=1))
    pipe = Pipeline(
        schedule, stages_for_rank(schedule, stages, context.rank), lm_loss,
        timeout=timeout, check_finite=True, store=context.store,
        on_action=context.report_action,
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        inputs, targets = make_batch(CONFIG, 8, generator)
        pipe.step(inputs, targets)
    return context.rank


def echo_rank(context: RankContext, value: int) -> tuple[int, int, int]:
    """Return (rank, world size, value + rank) after a barrier: the launcher round trip."""
    torch.distributed.barrier()
    return context.rank, context.world_size, value + context.rank


def pipeline_groups(context: RankContext, spec: Mesh) -> tuple[list[int], list[int], str]:
    """This rank's pp group from a gloo mesh, and from the same mesh taken for NCCL (which
    makes build_mesh replace it with a gloo twin), as ranks; and the twin's backend."""
    import torch.distributed as dist

    from stagewise.runtime.parallel import mesh

    plain = mesh.build_mesh(spec)
    mesh._backend = lambda group: "nccl"
    twin = mesh.build_mesh(spec)
    assert twin.pp_group is not plain.pp_group
    return (dist.get_process_group_ranks(plain.pp_group),
            dist.get_process_group_ranks(twin.pp_group), dist.get_backend(twin.pp_group))
