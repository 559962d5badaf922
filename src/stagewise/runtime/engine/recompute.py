"""Full activation recomputation: keep only each layer's input, recompute the rest in backward.

:class:`RecomputedSequential` runs its layers like ``nn.Sequential`` but through
``torch.utils.checkpoint`` (the non-reentrant form), so a forward saves one input tensor per
layer and the backward runs each layer's forward again before its backward. Parameter names
stay those of the ``nn.Sequential`` it replaces (``"0.weight"``...), so ties and checkpoints
that name parameters are unaffected.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["RecomputedSequential", "recomputed"]


class RecomputedSequential(nn.Sequential):
    """``nn.Sequential`` whose layers recompute their activations in backward.

    Example:
        >>> stage = RecomputedSequential(nn.Linear(4, 4), nn.Tanh())
        >>> stage(torch.ones(2, 4, requires_grad=True)).shape
        torch.Size([2, 4])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recompute = torch.is_grad_enabled()  # nothing to recompute without a backward
        for layer in self:
            x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        return x


def recomputed(stage: nn.Sequential) -> RecomputedSequential:
    """A :class:`RecomputedSequential` over the same layer objects as ``stage``."""
    return RecomputedSequential(*stage)
