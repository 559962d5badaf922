"""The runtime: run a schedule on torch.distributed ranks, partition a model, launch ranks.

Importing this package imports torch.
"""

from stagewise.runtime.engine.failure import NonFiniteLoss, PeerFailure, StepTimeout
from stagewise.runtime.engine.launch import RankContext, in_torchrun, launch, torchrun_context
from stagewise.runtime.engine.lowering import lower
from stagewise.runtime.engine.partition import balance, partition, stages_for_rank
from stagewise.runtime.engine.pipeline import Pipeline

__all__ = [
    "NonFiniteLoss",
    "PeerFailure",
    "Pipeline",
    "RankContext",
    "StepTimeout",
    "balance",
    "in_torchrun",
    "launch",
    "lower",
    "partition",
    "stages_for_rank",
    "torchrun_context",
]
