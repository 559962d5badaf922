"""Check a pipelined Hugging Face model against the whole model in one process.

:func:`check_hf_rank` runs on every rank of a launched group: it builds the model from a seed,
cuts it with :func:`~stagewise.runtime.hf_models.hf_layers`, partitions the layers into the
schedule's stages (tied embeddings become the pipeline's ties via ``stage_ties``), trains a few
SGD steps, and compares the loss and the gradient of every parameter of its own stages with a
second copy of the unsplit Hugging Face model (built from the same seed) trained here on the
whole batch. Parameters are matched by name through the model the layers were cut from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from stagewise.runtime.hf_models import build_hf_model, hf_layers
from stagewise.runtime.launch import RankContext
from stagewise.runtime.model_parts import stage_ties
from stagewise.runtime.partition import partition, stages_for_rank
from stagewise.runtime.pipeline import Pipeline
from stagewise.runtime.tiny_gpt import GPTConfig, lm_loss, make_batch
from stagewise.runtime.verify import _close
from stagewise.schedules.registry import build

__all__ = ["ModelCase", "check_hf_rank"]


@dataclass(frozen=True)
class ModelCase:
    """One equivalence check of a Hugging Face model under a schedule.

    Attributes:
        family: ``"llama"`` or ``"gpt2"``.
        config: Hugging Face config fields over the tiny default.
        schedule: a registered schedule name, built for the launched ranks.
        num_microbatches: micro-batches per step.
        batch_size: rows per step.
        seq_len: tokens per row.
        steps: SGD steps (each compared).
    """

    family: str
    schedule: str
    config: Mapping[str, Any] = field(default_factory=dict)
    num_microbatches: int = 4
    batch_size: int = 8
    seq_len: int = 8
    steps: int = 2

    @property
    def label(self) -> str:
        """``family schedule`` and the config, for messages."""
        return f"{self.family} {self.schedule} {dict(self.config)}"


def check_hf_rank(
    context: RankContext, cases: list[ModelCase], timeout: float = 60.0
) -> dict[str, list[str]]:
    """Run every case on this rank; per case label, the mismatches found (empty: all equal)."""
    return {case.label: _check_case(context, case, timeout) for case in cases}


def _check_case(context: RankContext, case: ModelCase, timeout: float) -> list[str]:
    schedule = build(
        case.schedule, num_ranks=context.world_size, num_microbatches=case.num_microbatches
    )
    model = build_hf_model(case.family, case.config, seed=1)
    reference = build_hf_model(case.family, case.config, seed=1)
    names = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(reference.named_parameters())
    layers, ties = hf_layers(model)
    stages = partition(layers, schedule.num_stages)
    mine = stages_for_rank(schedule, stages, context.rank)
    pipe = Pipeline(
        schedule, mine, lm_loss, timeout=timeout, store=context.store,
        tied=stage_ties(ties, [len(s) for s in stages]),
    )
    params = list({id(p): p for m in mine.values() for p in m.parameters()}.values())
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    config: Any = model.config
    vocab = int(config.vocab_size)
    data = GPTConfig(vocab=vocab, seq_len=case.seq_len)
    generator = torch.Generator().manual_seed(7)
    problems: list[str] = []
    compared = 0
    for step in range(case.steps):
        inputs, targets = make_batch(data, case.batch_size, generator)
        loss = pipe.step(inputs, targets)
        ref_loss = lm_loss(reference(input_ids=inputs).logits, targets)
        ref_loss.backward()
        label = f"rank {context.rank} step {step}"
        if (loss is not None) != (schedule.num_stages - 1 in mine):
            problems.append(f"{label}: loss returned on the wrong rank")
        if loss is not None:
            compared += _close(loss, ref_loss.detach(), f"{label} loss", problems)
        for p in params:
            expected = ref_params[names[id(p)]].grad
            if p.grad is None or expected is None:
                problems.append(f"{label}: {names[id(p)]} has no gradient")
                continue
            compared += _close(p.grad, expected, f"{label} {names[id(p)]}", problems)
        optimizer.step()
        ref_optimizer.step()
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
    if compared == 0:
        problems.append(f"rank {context.rank}: nothing was compared")
    return problems
