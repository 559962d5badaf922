"""Check the global gradient norm and its clipping against one process holding the whole model.

:func:`check_norm_rank` runs on every rank of a launched group. For each case it builds the
model from a seed (the tiny GPT, or GPT-2 with its input embedding tied to its head), cuts it
into the schedule's stages, keeps this rank's, shards them (tp, or FSDP2 over dp) as the case
says, runs one pipeline step on its replica's slice of the global batch, averages over plain
replicas, and clips by the global norm. A deep copy of the whole model, taken before sharding,
runs the whole global batch in this process and is clipped by ``torch.nn.utils.clip_grad_norm_``.
Both norms and every clipped gradient of this rank's stages (sharded ones gathered whole) are
compared. With ``accumulate`` the global batch is trained as two pipeline steps of half the
rows through :class:`GradAccumulation` (one optimizer step).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stagewise.mesh import Mesh
from stagewise.runtime.engine.launch import RankContext
from stagewise.runtime.engine.partition import partition, stages_for_rank
from stagewise.runtime.engine.pipeline import Pipeline
from stagewise.runtime.models.hf_models import hf_parts
from stagewise.runtime.models.model_parts import stage_ties
from stagewise.runtime.models.tiny_gpt import GPTConfig, gpt_layers, lm_loss, make_batch, tp_plan
from stagewise.runtime.parallel.mesh import (
    MeshGroups,
    average_gradients,
    build_mesh,
    replica_slice,
    shard_replicas,
)
from stagewise.runtime.parallel.tensor_parallel import apply_tensor_parallel
from stagewise.schedules.registry import build
from stagewise.train.grad_norm import clip_grad_norm
from stagewise.train.optim import GradAccumulation

__all__ = ["NormCase", "check_norm_rank"]

TINY = GPTConfig(vocab=16, seq_len=8, dim=16, heads=2, layers=4)
GPT2 = {"n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 32}
MAX_NORM = 0.05  # below every case's norm (about 0.5 to 3), so clipping always scales
RTOL = 1e-5  # float32: norms and gradients agree to a few ulps of summation order
ATOL = 1e-7


@dataclass(frozen=True)
class NormCase:
    """One comparison.

    Attributes:
        mesh: pp, dp (or fsdp) and tp sizes; the world is its size.
        model: ``"tiny"`` (no ties) or ``"gpt2"`` (embedding tied to the head across stages).
        schedule: the pipeline schedule's name.
        accumulate: two half-batch pipeline steps through ``GradAccumulation``.
    """

    mesh: Mesh
    model: str = "tiny"
    schedule: str = "1f1b"
    accumulate: bool = False

    @property
    def label(self) -> str:
        """``model schedule mesh``, for messages."""
        extra = " accumulate" if self.accumulate else ""
        return f"{self.model} {self.schedule} {self.mesh.text()}{extra}"


def check_norm_rank(context: RankContext, cases: list[NormCase]) -> dict[str, dict[str, Any]]:
    """Run every case; per label, this rank's ``norm``, the ``reference`` norm and the
    ``problems`` found (empty: all equal)."""
    return {case.label: _check_case(context, case) for case in cases}


def _layers(case: NormCase) -> tuple[list[nn.Module], list[dict[int, str]], int]:
    """The model's layers (weights from seed 1), its per-layer ties, its vocabulary."""
    if case.model == "gpt2":
        parts = hf_parts("gpt2", GPT2, seed=1, seq_len=8)
        return list(parts.layers), [dict(t) for t in parts.ties], GPT2["vocab_size"]
    return gpt_layers(TINY, seed=1), [], TINY.vocab


def _check_case(context: RankContext, case: NormCase) -> dict[str, Any]:
    spec = case.mesh
    groups = build_mesh(spec) if spec.world_size > spec.pp or spec.dp_shard else None
    pp_rank = groups.pp_rank if groups is not None else context.rank
    schedule = build(case.schedule, num_ranks=spec.pp, num_microbatches=2)
    layers, layer_ties, vocab = _layers(case)
    reference = nn.Sequential(*copy.deepcopy(layers))  # one copy: shared weights stay shared
    stages = partition(layers, schedule.num_stages)
    ties = stage_ties(layer_ties, [len(s) for s in stages])
    mine = stages_for_rank(schedule, stages, pp_rank)
    _shard(spec, groups, mine, schedule)
    pipe = Pipeline(schedule, mine, lm_loss, group=groups.pp_group if groups else None,
                    timeout=60.0, store=context.store, tied=ties)
    inputs, targets = make_batch(GPTConfig(vocab=vocab, seq_len=8), 8, torch.Generator()
                                 .manual_seed(7))
    dp, dp_rank = spec.dp, groups.dp_rank if groups is not None else 0
    mine_in, mine_out = replica_slice(inputs, dp, dp_rank), replica_slice(targets, dp, dp_rank)
    steps = 2 if case.accumulate else 1
    accumulation = GradAccumulation(mine, steps)
    for half in range(steps):
        rows = slice(half * len(mine_in) // steps, (half + 1) * len(mine_in) // steps)
        accumulation.before_step()
        pipe.step(mine_in[rows], mine_out[rows])
        if groups is not None and not spec.dp_shard:
            average_gradients(mine.values(), groups.dp_group)
    accumulation.finish()
    norm = clip_grad_norm(mine, MAX_NORM, groups, ties=ties)
    lm_loss(reference(inputs), targets).backward()
    expected = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM))
    problems: list[str] = []
    label = f"{case.label} rank {context.rank}"
    if abs(norm - expected) > RTOL * expected:
        problems.append(f"{label}: global norm {norm!r}, one process {expected!r}")
    if expected <= MAX_NORM:
        problems.append(f"{label}: norm {expected} does not exceed {MAX_NORM}: nothing clipped")
    _compare_grads(mine, stages, reference, label, problems)
    return {"norm": norm, "reference": expected, "problems": problems}


def _shard(spec: Mesh, groups: MeshGroups | None, mine: dict[int, nn.Module],
           schedule: Any) -> None:
    """Tensor-parallel blocks over tp, then FSDP2 over dp when the mesh says fsdp."""
    if groups is None:
        return
    if spec.tp > 1:
        for module in mine.values():
            apply_tensor_parallel(module, groups.tp_mesh, tp_plan)
    if spec.dp_shard:
        shard_replicas(mine, groups, schedule)


def _compare_grads(mine: dict[int, nn.Module], stages: list[nn.Sequential],
                   reference: nn.Sequential, label: str, problems: list[str]) -> None:
    """Every clipped gradient of this rank's stages (DTensors gathered) against the
    reference's (a collective over tp and fsdp peers, which hold the same stages)."""
    from torch.distributed.tensor import DTensor

    for stage, module in sorted(mine.items()):
        first = sum(len(s) for s in stages[:stage])
        ref_module = reference[first : first + len(stages[stage])]
        pairs = zip(module.named_parameters(), ref_module.parameters(), strict=True)
        for (name, param), ref_param in pairs:
            grad, expected = param.grad, ref_param.grad
            if grad is None or expected is None:
                problems.append(f"{label} stage {stage} {name}: no gradient")
                continue
            if isinstance(grad, DTensor):
                grad = grad.full_tensor()
            try:
                torch.testing.assert_close(grad, expected, rtol=RTOL, atol=ATOL)
            except AssertionError as err:
                problems.append(f"{label} stage {stage} {name}: {' '.join(str(err).split())}")
