"""Check pipeline x data parallelism against one process running the whole global batch.

:func:`check_mesh_rank` runs on every rank of a launched ``pp * dp`` group: it builds the mesh,
the tiny GPT from a seed, cuts it into the schedule's stages, and trains a few steps: each
replica runs the pipeline on its slice of the global batch, then gradients (and the loss) are
averaged over the dp group. Every rank compares the loss and every gradient of its own stages
with a deep copy of the whole model trained in this one process on the whole global batch.
"""

from __future__ import annotations

import copy

import torch

from stagewise.runtime.launch import RankContext
from stagewise.runtime.mesh import (
    MeshSpec,
    OverlappedAverage,
    average_gradients,
    average_loss,
    build_mesh,
    replica_slice,
)
from stagewise.runtime.partition import partition, stages_for_rank
from stagewise.runtime.pipeline import Pipeline
from stagewise.runtime.tiny_gpt import GPTConfig, gpt_layers, lm_loss, make_batch
from stagewise.runtime.verify import _close
from stagewise.schedules.registry import build

__all__ = ["check_mesh_rank"]

CONFIG = GPTConfig(vocab=16, seq_len=8, dim=16, heads=2, layers=4)


def check_mesh_rank(
    context: RankContext,
    spec: MeshSpec,
    schedules: list[str],
    overlap: bool = False,
    num_microbatches: int = 4,
    batch_size: int = 8,
    steps: int = 2,
    timeout: float = 60.0,
) -> dict[str, list[str]]:
    """Run each named schedule over the mesh; return the mismatches found on this rank.

    ``overlap`` averages gradients with :class:`OverlappedAverage` (during the step) instead
    of :func:`average_gradients` (after it).

    Mismatches are collected, not raised, so every rank stays in step and every case runs.
    """
    groups = build_mesh(spec)
    results: dict[str, list[str]] = {}
    for name in schedules:
        schedule = build(name, num_ranks=spec.pp, num_microbatches=num_microbatches)
        layers = gpt_layers(CONFIG, seed=1)
        reference = torch.nn.Sequential(*copy.deepcopy(layers))
        stages = partition(layers, schedule.num_stages)
        mine = stages_for_rank(schedule, stages, groups.pp_rank)
        reducer = OverlappedAverage(schedule, groups.pp_rank, mine, groups.dp_group)
        pipe = Pipeline(
            schedule, mine, lm_loss, group=groups.pp_group, timeout=timeout, store=context.store,
            on_action=reducer.on_action if overlap else None,
        )
        params = [p for module in mine.values() for p in module.parameters()]
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
        generator = torch.Generator().manual_seed(7)
        problems: list[str] = []
        compared = 0
        for number in range(steps):
            inputs, targets = make_batch(CONFIG, batch_size, generator)
            loss = pipe.step(
                replica_slice(inputs, spec.dp, groups.dp_rank),
                replica_slice(targets, spec.dp, groups.dp_rank),
            )
            if overlap:
                reducer.finish()
            else:
                average_gradients(mine.values(), groups.dp_group)
            ref_loss = lm_loss(reference(inputs), targets)
            ref_loss.backward()
            label = f"{name} rank {context.rank} step {number}"
            if loss is not None:
                mean = average_loss(loss, groups.dp_group)
                compared += _close(mean, ref_loss.detach(), f"{label} loss", problems)
            for stage, module in mine.items():
                first = sum(len(s) for s in stages[:stage])
                ref_module = reference[first : first + len(stages[stage])]
                pairs = zip(module.named_parameters(), ref_module.parameters(), strict=True)
                for (param_name, p), q in pairs:
                    if p.grad is None or q.grad is None:
                        problems.append(f"{label}: stage {stage} {param_name} has no gradient")
                        continue
                    compared += _close(
                        p.grad, q.grad, f"{label} stage {stage} {param_name}", problems
                    )
            optimizer.step()
            ref_optimizer.step()
            optimizer.zero_grad()
            ref_optimizer.zero_grad()
        if compared == 0:
            problems.append(f"{name} rank {context.rank}: nothing was compared")
        results[name] = problems
    return results
