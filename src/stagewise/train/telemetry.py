"""What a rank reports each step: metrics to JSON lines and TensorBoard, MFU, peak memory.

Only the rank that shows progress (the last stage of the first replica) writes the per-step
metrics; every rank reports its own peak memory at the end (``RankResult.peak_memory_bytes``).
MFU uses the planner's FLOP count of the model and the GPU's dense bf16 peak; on a CPU there
is no meaningful peak, so it is left out (None).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from stagewise.errors import StagewiseError
from stagewise.runconfig import RunConfig
from stagewise.runtime.models.tiny_gpt import GPTConfig
from stagewise.train.metrics import (
    MetricsWriter,
    flops_per_token,
    gpu_peak_flops,
    mfu,
    peak_memory_bytes,
    tiny_gpt_spec,
)

__all__ = ["Telemetry"]


class Telemetry:
    """Per-step metrics of one rank (a no-op unless it writes them)."""

    def __init__(self, config: RunConfig, seq_len: int, writes: bool) -> None:
        self.config = config
        metrics = config.metrics
        self.writer = (MetricsWriter(metrics.jsonl, metrics.tensorboard)
                       if writes and (metrics.jsonl or metrics.tensorboard) else None)
        self.tokens = config.batch.global_batch * seq_len * config.training.grad_accum
        self.flops = _flops_per_token(config, seq_len)
        self.peak = _run_peak_flops(config) if config.launch.device == "cuda" else None

    @property
    def wanted(self) -> bool:
        """Whether the run writes metrics at all (every rank agrees: a config setting)."""
        metrics = self.config.metrics
        return bool(metrics.jsonl or metrics.tensorboard)

    def write(self, step: int, loss: float | None, lr: float, grad_norm: float | None,
              seconds: float) -> None:
        """Record step ``step`` (counted from 1) if this rank writes metrics."""
        if self.writer is None:
            return
        tokens_per_s = self.tokens / seconds
        self.writer.write(
            step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
            mfu=None if self.flops is None else mfu(tokens_per_s, self.flops, self.peak),
            memory_bytes=peak_memory_bytes(self.config.launch.device),
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _run_peak_flops(config: RunConfig) -> float | None:
    """The dense bf16 peak of every GPU the run trains on together: the whole run's tokens/s
    is measured against it. Under torchrun each rank has its own GPU; local ranks beyond this
    machine's GPU count share them (a plain pipeline on one GPU counts that GPU once)."""
    one = gpu_peak_flops(torch.cuda.get_device_name())
    if one is None:
        return None
    ranks = config.world_size
    gpus = ranks if "TORCHELASTIC_RUN_ID" in os.environ else min(ranks, torch.cuda.device_count())
    return one * gpus


def _flops_per_token(config: RunConfig, seq_len: int) -> float | None:
    """The planner's FLOPs per trained token of the run's model (None: no count for it)."""
    model, lora = config.model, config.training.lora is not None
    spec: Any
    if model.spec == "tiny":
        assert model.layers is not None
        assert model.dim is not None
        assert model.heads is not None
        spec = tiny_gpt_spec(layers=model.layers, dim=model.dim, heads=model.heads,
                             vocab=GPTConfig.vocab, seq_len=seq_len)
    elif model.is_folder:
        from pathlib import Path

        from stagewise.runtime.models.hf_folder import read_model_config

        spec = read_model_config(Path(model.spec))
    elif model.hf_config:
        spec = {"model_type": model.spec[3:], **model.hf_config}
    else:
        return None
    try:
        return flops_per_token(spec, seq_len, lora=lora)
    except StagewiseError:
        return None
