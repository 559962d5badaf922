"""What is trained and how it is split: :class:`TrainingSpec` and :class:`ParallelConfig`.

Notation: t tensor-parallel size, p pipeline ranks, d data-parallel replicas, v chunks (virtual
stages) per pipeline rank, b micro-batch size, m micro-batches per step = G / (d b) for a
global batch of G sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

from stagewise.errors import PlanError
from stagewise.plan.models import ModelSpec

__all__ = ["RECOMPUTE_MODES", "ParallelConfig", "TrainingSpec", "split_layers"]

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class TrainingSpec:
    """The run: sequence length, global batch and the training recipe.

    Attributes:
        seq: tokens per sequence (s).
        global_batch: sequences per optimizer step (G).
        mode: ``"full"`` training or ``"lora"`` fine-tuning (frozen base weights).
        lora_rank: adapter rank r for LoRA; adapters go on every linear of every block.
        attention: ``"flash"`` (fused, causal blocks skipped, no s x s tensor stored) or
            ``"unfused"`` (scores, softmax and dropout as separate kernels, Megatron 2022).
        dropout: ``None`` takes the model's own setting.
        grad_bytes: bytes per gradient element kept and reduced (4: fp32 main grads, as
            Megatron does for bf16).
        dp_overlap: the data-parallel gradient reduction overlaps the last backward.
    """

    seq: int
    global_batch: int
    mode: str = "full"
    lora_rank: int = 16
    attention: str = "flash"
    dropout: bool | None = None
    grad_bytes: int = 4
    dp_overlap: bool = True

    def __post_init__(self) -> None:
        for label in ("seq", "global_batch", "lora_rank", "grad_bytes"):
            value = getattr(self, label)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"{label} must be a positive integer, got {value!r}")
        if self.mode not in ("full", "lora"):
            raise PlanError(f"mode must be 'full' or 'lora', got {self.mode!r}")
        if self.attention not in ("flash", "unfused"):
            raise PlanError(f"attention must be 'flash' or 'unfused', got {self.attention!r}")

    def uses_dropout(self, model: ModelSpec) -> bool:
        return model.dropout if self.dropout is None else self.dropout


@dataclass(frozen=True)
class ParallelConfig:
    """One way to split the run over the cluster.

    Attributes:
        tp: tensor-parallel size (inside a node).
        pp: pipeline ranks.
        dp: data-parallel replicas.
        vp: chunks (virtual stages) per pipeline rank.
        micro_batch_size: sequences per micro-batch (b).
        recompute: ``none``, ``selective`` (attention core) or ``full`` (whole block).
        sequence_parallel: norms, dropout and residuals sharded over the TP group.
        distributed_optimizer: optimizer state sharded over DP (ZeRO-1).
        schedule: a stagewise schedule name (``1f1b``, ``interleaved-1f1b``, ...).
    """

    tp: int
    pp: int
    dp: int
    vp: int = 1
    micro_batch_size: int = 1
    recompute: str = "none"
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    schedule: str = "1f1b"

    def __post_init__(self) -> None:
        for label in ("tp", "pp", "dp", "vp", "micro_batch_size"):
            value = getattr(self, label)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"{label} must be a positive integer, got {value!r}")
        if self.recompute not in RECOMPUTE_MODES:
            raise PlanError(
                f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {self.recompute!r}"
            )

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def num_microbatches(self, training: TrainingSpec) -> int:
        """m = G / (d b); raises PlanError when that is not a whole number."""
        per_replica, rest = divmod(training.global_batch, self.dp * self.micro_batch_size)
        if rest or per_replica < 1:
            raise PlanError(
                f"global batch {training.global_batch} is not a multiple of dp x micro-batch "
                f"size = {self.dp} x {self.micro_batch_size}: choose a global batch divisible "
                f"by {self.dp * self.micro_batch_size} or another dp/micro-batch size"
            )
        return per_replica

    def describe(self) -> str:
        parts = [f"TP={self.tp}", f"PP={self.pp}", f"DP={self.dp}"]
        if self.vp > 1:
            parts.append(f"VP={self.vp}")
        parts.append(f"mbs={self.micro_batch_size}")
        parts.append(f"recompute={self.recompute}")
        if self.sequence_parallel:
            parts.append("SP")
        if self.distributed_optimizer:
            parts.append("dist-opt")
        parts.append(self.schedule)
        return " ".join(parts)


def split_layers(num_layers: int, num_stages: int) -> tuple[int, ...]:
    """Layers per (virtual) stage: as even as possible, the extra layers in the middle stages.

    The first stage also holds the embedding and the last the output head, so when the split
    is uneven the stages that get one layer fewer are the outer ones.

    Raises:
        PlanError: fewer layers than stages.

    Example:
        >>> split_layers(10, 4)
        (2, 3, 3, 2)
    """
    if num_stages > num_layers:
        raise PlanError(
            f"cannot split {num_layers} layers over {num_stages} (virtual) stages: every stage "
            "needs at least one layer; lower pp or vp"
        )
    base, extra = divmod(num_layers, num_stages)
    counts = [base] * num_stages
    start = (num_stages - extra) // 2
    for i in range(start, start + extra):
        counts[i] += 1
    return tuple(counts)
