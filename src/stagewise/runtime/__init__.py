"""The runtime: run a schedule on torch.distributed ranks, partition a model, launch ranks.

Importing this package imports torch.
"""

from stagewise.runtime.failure import NonFiniteLoss, PeerFailure, StepTimeout
from stagewise.runtime.launch import RankContext, in_torchrun, launch, torchrun_context
from stagewise.runtime.lowering import lower
from stagewise.runtime.partition import balance, partition, stages_for_rank
from stagewise.runtime.pipeline import Pipeline

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
