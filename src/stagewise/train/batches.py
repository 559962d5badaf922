"""Where each step's batch comes from: the run's data (``stagewise.data``) or generated data.

Every rank computes the step's whole global batch (a function of the seed and the step, so a
resumed run continues with the next samples) and takes its replica's slice; the pipeline reads
the inputs only on the first stage's rank and the targets only on the last's. With real data
some targets are out of the loss (-100: prompts, padding), so each micro-batch's loss is
weighted by its share of the global batch's in-loss tokens: the step's loss, averaged over the
replicas, is then the mean over every in-loss token of the global batch, as one process would
compute it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from stagewise.errors import ConfigError
from stagewise.runconfig import RunConfig
from stagewise.runtime.models.model_parts import ModelParts
from stagewise.runtime.parallel.mesh import replica_slice

__all__ = ["IGNORE", "Batches", "generated_batch", "load_data"]

IGNORE = -100  # a target out of the loss (cross-entropy's ignore_index)


@dataclass(frozen=True)
class Loaded:
    """The run's tokenised data: for training, evaluation, or both (None: not given)."""

    train: Any | None
    eval: Any | None
    tokenizer_size: int


def load_data(config: RunConfig, *, progress: bool = False) -> Loaded:
    """Tokenise (or read from the cache) the run's data with its tokenizer.

    Raises:
        ConfigError: the data or the tokenizer cannot be read (see ``stagewise.data``).
    """
    from stagewise.data import load_packed, load_tokenizer

    data = config.data
    tokenizer = load_tokenizer(data.tokenizer or config.model.spec)
    loaded = [
        load_packed(list(paths), tokenizer, seq_len=config.batch.seq_len,
                    seed=config.training.seed, cache_dir=data.cache_dir, progress=progress)
        if paths else None
        for paths in (data.paths, data.eval_paths)
    ]
    return Loaded(loaded[0], loaded[1], len(tokenizer))


def generated_batch(parts: ModelParts, seed: int, step: int,
                    rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s global batch of the model's generated data: a function of the seed and
    the step alone (a resumed run sees the data an uninterrupted one would)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
    return parts.make_batch(rows, generator)


class Batches:
    """The batches of one rank: the global batch of a step, its replica's slice and weights."""

    def __init__(self, config: RunConfig, parts: ModelParts, loaded: Loaded | None,
                 dp_rank: int) -> None:
        self.config, self.parts, self.dp_rank = config, parts, dp_rank
        self.train = loaded.train if loaded is not None else None
        self.eval = loaded.eval if loaded is not None else None

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, list[float] | None]:
        """Step ``step``'s inputs and targets for this replica, and the micro-batch weights
        (None: by rows, for generated data whose every target is in the loss)."""
        rows = self.config.batch.global_batch
        if self.train is None:
            inputs, targets = generated_batch(self.parts, self.config.training.seed, step, rows)
            return (*self._slice(inputs, targets), None)
        inputs, targets = self.train.batch(step, rows)
        return self._weighted(inputs, targets)

    def evaluation(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[float], int]]:
        """The eval set in global batches: this replica's inputs, targets, micro-batch weights,
        and the global batch's count of in-loss tokens (to weigh the batch's mean loss)."""
        assert self.eval is not None
        for inputs, targets in self.eval.eval_batches(self.config.batch.global_batch,
                                                      pad_last=True):
            count = int((targets != IGNORE).sum())
            if count:
                yield (*self._weighted(inputs, targets), count)

    def position(self, step: int) -> dict[str, int] | None:
        """Where step ``step``'s batch starts in the data (for checkpoints), None without."""
        if self.train is None:
            return None
        where: dict[str, int] = self.train.position(step, self.config.batch.global_batch)
        return {**where, "global_batch": self.config.batch.global_batch}

    def _slice(self, inputs: torch.Tensor,
               targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dp = self.config.mesh.dp
        if dp == 1:
            return inputs, targets
        return replica_slice(inputs, dp, self.dp_rank), replica_slice(targets, dp, self.dp_rank)

    def _weighted(self, inputs: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        total = int((targets != IGNORE).sum())
        if total == 0:
            raise ConfigError("a batch has no target in the loss: check the data's masks")
        mine_inputs, mine_targets = self._slice(inputs, targets)
        m = self.config.schedule.num_microbatches
        dp = self.config.mesh.dp
        parts = torch.tensor_split(mine_targets, m, dim=0)
        weights = [float((part != IGNORE).sum()) * dp / total for part in parts]
        return mine_inputs, mine_targets, weights
