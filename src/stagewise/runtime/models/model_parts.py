"""A model as the pipeline sees it: layers in order, a loss, tied weights and its data.

Every model family stagewise trains (the tiny GPT, Hugging Face Llama and GPT-2, a user's own
``nn.Module`` split by module names) is turned into :class:`ModelParts`. The partitioner cuts
``layers`` into stages (each an ``nn.Sequential``, so a layer's parameter ``w`` of the i-th
layer inside a stage is named ``"i.w"`` there); :func:`stage_ties` turns the model's ties, given
per layer, into the per-stage names the :class:`~stagewise.runtime.engine.pipeline.Pipeline` takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from stagewise.errors import ConfigError
from stagewise.runtime.models.tp_plans import known_blocks_plan
from stagewise.runtime.parallel.tensor_parallel import TensorParallelPlan

__all__ = ["ModelParts", "layer_index", "stage_ties", "tiny_gpt_parts"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BatchFn = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ModelParts:
    """A model cut into layers that run one after another.

    Attributes:
        name: what it is, for reports (``"tiny-gpt"``, ``"hf:llama"``...).
        layers: ``layers[0]`` takes the input batch, each next layer the previous output (one
            tensor), the last returns what ``loss_fn`` scores.
        loss_fn: ``loss_fn(output, targets)``, a mean over the micro-batch's rows.
        make_batch: ``make_batch(rows, generator) -> (inputs, targets)``: training data.
        ties: weights that are one tensor in the model but live in two layers, each
            ``{layer index: parameter name inside that layer}``.
        seq_len: tokens per sequence of ``make_batch``.
        materialize: None when every parameter is real; else the layers' parameters are on
            the meta device (built by ``runtime.lazy_init``) and ``materialize(modules)``
            fills those inside ``modules``: call it on the stages a rank keeps.
        tp_plan: how the family's blocks shard over tensor-parallel ranks (see
            ``runtime.parallel.tensor_parallel``); by default the blocks stagewise knows (the
            tiny GPT's and Llama-style decoder layers).
    """

    name: str
    layers: tuple[nn.Module, ...]
    loss_fn: LossFn
    make_batch: BatchFn
    seq_len: int
    ties: tuple[Mapping[int, str], ...] = field(default=())
    materialize: Callable[[Iterable[nn.Module]], None] | None = None
    tp_plan: TensorParallelPlan = known_blocks_plan

    def __post_init__(self) -> None:
        for tie in self.ties:
            for index, name in tie.items():
                if not 0 <= index < len(self.layers):
                    raise ConfigError(
                        f"{self.name}: tie {dict(tie)} names layer {index} but the model has "
                        f"{len(self.layers)} layers"
                    )
                names = dict(self.layers[index].named_parameters(remove_duplicate=False))
                if name not in names:
                    raise ConfigError(
                        f"{self.name}: tie {dict(tie)}: layer {index} has no parameter {name!r}"
                    )


def layer_index(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``(stage, position inside the stage)`` of every layer, for stages of ``sizes`` layers.

    Example:
        >>> layer_index([2, 1])
        [(0, 0), (0, 1), (1, 0)]
    """
    return [(stage, i) for stage, size in enumerate(sizes) for i in range(size)]


def stage_ties(
    ties: Sequence[Mapping[int, str]], sizes: Sequence[int]
) -> list[dict[int, str]]:
    """The model's per-layer ties as the pipeline's per-stage ties, for stages of ``sizes``.

    A tie whose layers all fall in one stage needs nothing (the layers share the parameter
    object there) and is dropped.

    Example:
        >>> stage_ties([{0: "weight", 3: "out.weight"}], [2, 2])
        [{0: '0.weight', 1: '1.out.weight'}]
        >>> stage_ties([{0: "weight", 3: "out.weight"}], [4])
        []
    """
    where = layer_index(sizes)
    result = []
    for tie in ties:
        per_stage: dict[int, str] = {}
        for layer, name in sorted(tie.items()):
            stage, position = where[layer]
            per_stage.setdefault(stage, f"{position}.{name}")
        if len(per_stage) > 1:
            result.append(per_stage)
    return result


def tiny_gpt_parts(config: object | None = None, seed: int = 0) -> ModelParts:
    """The tiny GPT (``stagewise.runtime.models.tiny_gpt``) as :class:`ModelParts`."""
    from stagewise.runtime.models.tiny_gpt import (
        GPTConfig,
        gpt_layers,
        lm_loss,
        make_batch,
        tp_plan,
    )

    cfg = config if isinstance(config, GPTConfig) else GPTConfig()

    def batch(rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return make_batch(cfg, rows, generator)

    return ModelParts(
        name="tiny-gpt",
        layers=tuple(gpt_layers(cfg, seed=seed)),
        loss_fn=lm_loss,
        make_batch=batch,
        seq_len=cfg.seq_len,
        tp_plan=tp_plan,
    )
