"""A run as one object: :class:`RunConfig`, written as TOML and read back with clear errors.

``stagewise plan ... --emit-config run.toml`` writes one; ``stagewise train --config run.toml``
runs it; ``stagewise train``'s flags build the same object (flags are overrides applied to the
file's, or to the defaults). The file holds everything the trainer needs and, for the reader,
what the planner predicted (``[source]``)::

    [mesh]
    pp = 2
    dp = 2
    tp = 2                # dp_shard = true: FSDP2 over the replicas (--mesh pp=2,fsdp=2)

    [schedule]
    name = "interleaved-1f1b"
    num_chunks = 2        # v, chunks (virtual stages) per pipeline rank
    num_microbatches = 8  # m, per replica and step

    [batch]
    global_batch = 32     # sequences per step = micro_batch_size x num_microbatches x dp
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

    [checkpoint]          # optional: dir, save_every, keep, resume
    [launch]              # optional: device, timeout, threads
    [data]                # optional: paths, eval_paths, eval_every, tokenizer, cache_dir

Every key has a default (``stagewise train``'s), so a file names only what it changes. Pure
Python: importing this package imports neither torch nor transformers.
"""

from stagewise.mesh import Mesh
from stagewise.runconfig.config import RunConfig
from stagewise.runconfig.load import load_run_config, parse_run_config
from stagewise.runconfig.model import ModelConfig
from stagewise.runconfig.sections import (
    RECOMPUTE,
    BatchConfig,
    CheckpointConfig,
    DataConfig,
    LaunchConfig,
    MetricsConfig,
    ScheduleConfig,
    SourceInfo,
    TrainingConfig,
)

__all__ = [
    "RECOMPUTE",
    "BatchConfig",
    "CheckpointConfig",
    "DataConfig",
    "LaunchConfig",
    "Mesh",
    "MetricsConfig",
    "ModelConfig",
    "RunConfig",
    "ScheduleConfig",
    "SourceInfo",
    "TrainingConfig",
    "load_run_config",
    "parse_run_config",
]
