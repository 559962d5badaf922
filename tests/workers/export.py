"""Rank function for the export tests: a model folder's layers, cut over pipeline ranks,
changed and saved as a checkpoint (each rank its own stage, read lazily from the folder)."""

from __future__ import annotations

import torch

from stagewise.runtime.checkpoint.state import rank_layers, save_checkpoint
from stagewise.runtime.engine.launch import RankContext
from stagewise.runtime.engine.partition import partition
from stagewise.runtime.models.hf_folder import folder_parts

__all__ = ["SCALE", "save_pipeline_checkpoint"]

SCALE = 1.25  # every weight is multiplied by this before the save


def save_pipeline_checkpoint(context: RankContext, folder: str, checkpoint: str, step: int) -> int:
    """Rank ``r`` of ``num_ranks`` keeps stage ``r`` of the folder's model (an even cut), scales
    its weights by :data:`SCALE` and writes its share of checkpoint ``step``; returns how many
    layers it held."""
    parts = folder_parts(folder, seq_len=8)
    stages = partition(parts.layers, context.world_size, "even")
    mine = {context.rank: stages[context.rank]}
    assert parts.materialize is not None
    parts.materialize(mine.values())
    params = list({id(p): p for p in mine[context.rank].parameters()}.values())
    with torch.no_grad():
        for param in params:
            param.mul_(SCALE)
    layers = rank_layers(mine, [len(stage) for stage in stages])
    save_checkpoint(checkpoint, step, layers, torch.optim.AdamW(params))
    return len(layers)
