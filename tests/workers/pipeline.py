"""Check a pipeline against one process running the whole model (the equivalence test).

:func:`check_rank` runs on every rank of a launched group: it builds the tiny GPT from a seed,
cuts it into the schedule's stages, trains a few steps through :class:`Pipeline`, and compares
the loss and every gradient of its own stages with a deep copy of the whole model trained in
this one process on the whole batch. The tests and ``stagewise train --verify`` use it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from stagewise.runtime.engine.launch import RankContext
from stagewise.runtime.engine.partition import partition, stages_for_rank
from stagewise.runtime.engine.pipeline import Pipeline
from stagewise.runtime.engine.recompute import recomputed
from stagewise.runtime.models.tiny_gpt import (
    Embedding,
    GPTConfig,
    Head,
    gpt_layers,
    lm_loss,
    make_batch,
)
from stagewise.schedules.ir import Schedule

__all__ = ["Case", "check_rank"]


@dataclass(frozen=True)
class Case:
    """One equivalence check.

    Attributes:
        schedule: the schedule to run.
        batch_size: rows per step (split into the schedule's micro-batches).
        seq_lens: sequence length of each step (one optimizer step after each).
        tied: tie the input embedding to the output projection (the reference uses one
            tensor for both; the pipeline a tied copy per stage).
        config: the model.
        recompute: run every stage with full activation recomputation.
    """

    schedule: Schedule
    batch_size: int
    seq_lens: tuple[int, ...] = (8, 8, 6)
    tied: bool = False
    config: GPTConfig = field(
        default_factory=lambda: GPTConfig(vocab=16, seq_len=8, dim=16, heads=2, layers=6)
    )
    recompute: bool = False


def check_rank(
    context: RankContext, cases: list[Case], timeout: float = 60.0
) -> dict[str, list[str]]:
    """Run every case on this rank.

    Returns, per case label (``name p=.. m=..``), the mismatches found on this rank (empty when
    the loss and every gradient of this rank's stages matched in every step). Mismatches are
    collected, not raised, so all ranks stay in step and every case runs.
    """
    return {case_label(case): _check_case(context, case, timeout) for case in cases}


def case_label(case: Case) -> str:
    """``name p=.. m=..`` of a case (`` tied`` when the embedding is tied)."""
    s = case.schedule
    label = f"{s.name} p={s.num_ranks} m={s.num_microbatches}"
    return label + (" tied" if case.tied else "") + (" recompute" if case.recompute else "")


def _close(actual: torch.Tensor, expected: torch.Tensor, label: str, problems: list[str]) -> int:
    try:
        torch.testing.assert_close(actual, expected)
    except AssertionError as err:
        problems.append(f"{label}: {' '.join(str(err).split())}")
    return 1


def _check_case(context: RankContext, case: Case, timeout: float) -> list[str]:
    schedule = case.schedule
    layers = gpt_layers(case.config, seed=1)
    reference = torch.nn.Sequential(*copy.deepcopy(layers))
    stages = partition(layers, schedule.num_stages)
    if case.recompute:
        stages = [recomputed(stage) for stage in stages]
    mine = stages_for_rank(schedule, stages, context.rank)
    ties = []
    if case.tied:
        embedding, head = reference[0], reference[-1]
        assert isinstance(embedding, Embedding)
        assert isinstance(head, Head)
        head.out.weight = embedding.tokens.weight
        last = schedule.num_stages - 1
        ties = [{0: "0.tokens.weight", last: f"{len(stages[last]) - 1}.out.weight"}]
    pipe = Pipeline(schedule, mine, lm_loss, timeout=timeout, store=context.store, tied=ties)
    params = [p for module in mine.values() for p in module.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(7)
    problems: list[str] = []
    compared = 0
    for number, length in enumerate(case.seq_lens):
        inputs, targets = make_batch(case.config, case.batch_size, generator, seq_len=length)
        loss = pipe.step(inputs, targets)
        ref_loss = lm_loss(reference(inputs), targets)
        ref_loss.backward()
        label = f"rank {context.rank} step {number}"
        holds_last = schedule.num_stages - 1 in mine
        if (loss is not None) != holds_last:
            problems.append(f"{label}: loss returned on the wrong rank")
        if loss is not None:
            compared += _close(loss, ref_loss.detach(), f"{label} loss", problems)
        for stage, module in mine.items():
            ref_module = reference[_first_layer(stages, stage) : _first_layer(stages, stage + 1)]
            pairs = zip(module.named_parameters(), ref_module.parameters(), strict=True)
            for (name, p), q in pairs:
                if p.grad is None or q.grad is None:
                    problems.append(f"{label}: stage {stage} {name} has no gradient")
                    continue
                compared += _close(p.grad, q.grad, f"{label} stage {stage} {name}", problems)
        optimizer.step()
        ref_optimizer.step()
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
    if compared == 0:
        problems.append(f"rank {context.rank}: nothing was compared")
    return problems


def _first_layer(stages: list[torch.nn.Sequential], stage: int) -> int:
    return sum(len(s) for s in stages[:stage])
