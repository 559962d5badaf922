"""Check a pipelined model against the whole model in one process.

:func:`check_model_rank` runs on every rank of a launched group: it builds the model from a seed
(a Hugging Face model, or a user's module from a factory), cuts it (``hf_layers``, or
``split_by_names``), partitions the layers into the schedule's stages (tied weights become the
pipeline's ties via ``stage_ties``), trains a few SGD steps, and compares the loss and the
gradient of every parameter of its own stages with a second copy of the unsplit model (built
from the same seed) trained here on the whole batch. Parameters are matched by name through the
model the layers were cut from.

:class:`TiedToyLM` is such a user's module (embedding, a ModuleList of blocks, a head whose
projection is the embedding's weight), for the ``split_by_names`` check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stagewise.runtime.engine.launch import RankContext
from stagewise.runtime.engine.partition import partition, stages_for_rank
from stagewise.runtime.engine.pipeline import Pipeline
from stagewise.runtime.models.hf_models import build_hf_model, hf_layers
from stagewise.runtime.models.model_parts import stage_ties
from stagewise.runtime.models.split_module import split_by_names
from stagewise.runtime.models.tiny_gpt import Block, GPTConfig, lm_loss, make_batch
from stagewise.schedules.registry import build
from workers.pipeline import _close

__all__ = ["ModelCase", "TiedToyLM", "check_model_rank"]

TOY = GPTConfig(vocab=16, seq_len=8, dim=16, heads=2, layers=2)


class TiedToyLM(nn.Module):
    """A user's language model: embedding, blocks, norm and a head tied to the embedding."""

    def __init__(self, config: GPTConfig = TOY) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.head = nn.Sequential(nn.LayerNorm(config.dim), nn.Linear(config.dim, config.vocab))
        self.head[1].weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.head(x)
        return out


@dataclass(frozen=True)
class ModelCase:
    """One equivalence check of a Hugging Face model under a schedule.

    Attributes:
        family: ``"llama"`` or ``"gpt2"``, or ``"toy"`` for :class:`TiedToyLM` split by names.
        config: Hugging Face config fields over the tiny default (not used by ``"toy"``).
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


def check_model_rank(
    context: RankContext, cases: list[ModelCase], timeout: float = 60.0
) -> dict[str, list[str]]:
    """Run every case on this rank; per case label, the mismatches found (empty: all equal)."""
    return {case.label: _check_case(context, case, timeout) for case in cases}


def _check_case(context: RankContext, case: ModelCase, timeout: float) -> list[str]:
    schedule = build(
        case.schedule, num_ranks=context.world_size, num_microbatches=case.num_microbatches
    )
    model, layers, ties, vocab = _build(case)
    reference = _build(case)[0]
    names = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(reference.named_parameters())
    stages = partition(layers, schedule.num_stages)
    mine = stages_for_rank(schedule, stages, context.rank)
    pipe = Pipeline(
        schedule, mine, lm_loss, timeout=timeout, store=context.store,
        tied=stage_ties(ties, [len(s) for s in stages]),
    )
    params = list({id(p): p for m in mine.values() for p in m.parameters()}.values())
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    data = GPTConfig(vocab=vocab, seq_len=case.seq_len)
    generator = torch.Generator().manual_seed(7)
    problems: list[str] = []
    compared = 0
    for step in range(case.steps):
        inputs, targets = make_batch(data, case.batch_size, generator)
        loss = pipe.step(inputs, targets)
        output = reference(inputs)
        ref_loss = lm_loss(output if isinstance(output, torch.Tensor) else output.logits, targets)
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


def _build(
    case: ModelCase,
) -> tuple[nn.Module, list[nn.Module], tuple[dict[int, str], ...], int]:
    """The whole model (weights from seed 1), its layers, their ties, its vocabulary size."""
    if case.family != "toy":
        model = build_hf_model(case.family, case.config, seed=1)
        layers, ties = hf_layers(model)
        config: Any = model.config
        return model, layers, ties, int(config.vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        toy = TiedToyLM()
    parts = split_by_names(
        toy, ["embed", "blocks", "head"], loss_fn=lm_loss, seq_len=TOY.seq_len,
        make_batch=lambda rows, generator: make_batch(TOY, rows, generator),
    )
    return toy, list(parts.layers), tuple(dict(t) for t in parts.ties), TOY.vocab
