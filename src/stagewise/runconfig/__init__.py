"""A run as a file: :class:`RunConfig`, written as TOML and read back with clear errors.

``stagewise plan ... --emit-config run.toml`` writes one; ``stagewise train --config run.toml``
runs it. The file holds everything the trainer needs (mesh, schedule, micro-batches, batch,
recompute, model) and, for the reader, what the planner predicted (``[source]``)::

    [mesh]
    pp = 2
    dp = 2
    tp = 2

    [schedule]
    name = "interleaved-1f1b"
    chunks = 2            # v, virtual stages per pipeline rank
    microbatches = 8      # m, per replica and step

    [batch]
    global_batch = 32     # sequences per step = micro_batch_size x microbatches x dp
    micro_batch_size = 2
    seq_len = 64

    [training]
    steps = 20
    lr = 0.003
    recompute = "none"    # or "full": every layer keeps only its input, reruns in backward

    [model]
    spec = "hf:llama"

    [model.hf_config]
    hidden_size = 64
    ...

Every key has a default (``stagewise train``'s), so a file names only what it changes. Pure
Python: importing this module imports neither torch nor transformers.
"""

from stagewise.runconfig.config import (
    RECOMPUTE,
    BatchConfig,
    MeshConfig,
    ModelConfig,
    RunConfig,
    ScheduleConfig,
    SourceInfo,
    TrainingConfig,
)
from stagewise.runconfig.load import load_run_config, parse_run_config

__all__ = [
    "RECOMPUTE",
    "BatchConfig",
    "MeshConfig",
    "ModelConfig",
    "RunConfig",
    "ScheduleConfig",
    "SourceInfo",
    "TrainingConfig",
    "load_run_config",
    "parse_run_config",
]
