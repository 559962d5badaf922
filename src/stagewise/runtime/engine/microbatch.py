"""Split a batch into micro-batches, and the weight each one's loss gets in the step's mean."""

from __future__ import annotations

import torch

from stagewise.errors import ConfigError

__all__ = ["loss_weights", "split_batch"]


def split_batch(
    batch: torch.Tensor, num_microbatches: int, what: str = "batch"
) -> list[torch.Tensor]:
    """Split ``batch`` along dimension 0 into ``num_microbatches`` nearly equal parts.

    Raises:
        ConfigError: ``batch`` is not a tensor or has fewer rows than micro-batches.

    Example:
        >>> [len(part) for part in split_batch(torch.zeros(7, 2), 3)]
        [3, 2, 2]
    """
    if not isinstance(batch, torch.Tensor):
        raise ConfigError(f"the {what} must be a torch.Tensor, got {type(batch).__name__}")
    if batch.dim() == 0 or batch.shape[0] < num_microbatches:
        rows = 0 if batch.dim() == 0 else batch.shape[0]
        raise ConfigError(
            f"the {what} has {rows} rows along dimension 0 but the schedule runs "
            f"{num_microbatches} micro-batches: give at least one row per micro-batch"
        )
    return list(torch.tensor_split(batch, num_microbatches, dim=0))


def loss_weights(parts: list[torch.Tensor]) -> list[float]:
    """Weight of each micro-batch's mean loss so the weighted sum is the whole batch's mean.

    A loss that averages over the rows of its micro-batch, weighted by the micro-batch's share
    of rows, sums to the loss averaged over the whole batch.

    Example:
        >>> loss_weights([torch.zeros(3), torch.zeros(1)])
        [0.75, 0.25]
    """
    total = sum(part.shape[0] for part in parts)
    return [part.shape[0] / total for part in parts]
