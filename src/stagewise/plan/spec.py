"""What is trained and how it is split: :class:`TrainingSpec` and :class:`ParallelConfig`.

Notation: t tensor-parallel size, p pipeline ranks, d data-parallel replicas, v chunks (virtual
stages) per pipeline rank, b micro-batch size, m micro-batches per step = G / (d b) for a
global batch of G sequences.

The mesh (t, p, d and whether the replicas shard their weights, FSDP) is the project's one mesh
type, :class:`stagewise.mesh.Mesh`, so a plan, a run file and the runtime say it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stagewise.errors import ConfigError, PlanError
from stagewise.mesh import Mesh
from stagewise.plan.models import ModelSpec

__all__ = [
    "DP_SHARDING",
    "ENGINES",
    "LAYER_SPLITS",
    "PRECISIONS",
    "RECOMPUTE_MODES",
    "ParallelConfig",
    "TrainingSpec",
    "split_layers",
    "stage_layers",
    "stage_slots",
]

RECOMPUTE_MODES = ("none", "selective", "full")
PRECISIONS = ("bf16", "fp8")
# What the data-parallel replicas shard (ZeRO stages 0-3): nothing; the optimizer state
# (ZeRO-1, Megatron's distributed optimizer); optimizer state and gradients (ZeRO-2); and
# weights too (ZeRO-3, FSDP: the mesh's dp_shard).
DP_SHARDING = ("none", "optimizer", "gradients", "weights")
# How the layers split over the (virtual) stages: "balanced", as evenly as possible (the
# extra layers in the middle stages); or "edges", the embedding and the loss each counted as
# one layer of the first and the last stage (Megatron-LM's --account-for-embedding-in-
# pipeline-split and --account-for-loss-in-pipeline-split; the Llama 3 405B split).
LAYER_SPLITS = ("balanced", "edges")
# Whose pipeline runtime runs the step, which decides how transfers, gradient accumulation and
# the data-parallel reduction are timed (:class:`TrainingSpec`'s ``engine``).
ENGINES = ("megatron", "deepspeed", "pytorch")


@dataclass(frozen=True)
class TrainingSpec:
    """The run: sequence length, global batch and the training recipe.

    Attributes:
        seq_len: tokens per sequence (s).
        global_batch: sequences per optimizer step (G).
        mode: ``"full"`` training or ``"lora"`` fine-tuning (frozen base weights).
        lora_rank: adapter rank r for LoRA; adapters go on every linear of every block.
        attention: ``"flash"`` (fused, causal blocks skipped, no s x s tensor stored) or
            ``"unfused"`` (scores, softmax and dropout as separate kernels, Megatron 2022).
        dropout: ``None`` takes the model's own setting.
        grad_bytes: bytes per gradient element kept and reduced (4: fp32 main grads, as
            Megatron does for bf16).
        dp_overlap: the data-parallel gradient reduction overlaps the last backward.
        precision: ``"bf16"``, or ``"fp8"`` (the block GEMMs in FP8 with bf16 weights kept,
            Transformer Engine style; GPUs without FP8 tensor cores refuse it).
        engine: whose runtime runs the step (:data:`ENGINES`). ``"megatron"``: Megatron-LM's
            schedules (NeMo's): each boundary's send and receive posted together and
            asynchronous, weight gradients accumulated in fp32 by the GEMM itself, the DP
            reduction overlapping the backward when ``dp_overlap``, the loss Megatron's
            vocabulary-parallel cross-entropy. ``"pytorch"``: the same pipeline and
            reduction timing, with PyTorch's own cross-entropy (one fused log-softmax kernel
            each way; ``stages.LOSS_BYTES``), as PyTorch FSDP/DDP stacks run it (torchtitan,
            Composer and LLM Foundry, Hugging Face, stagewise train). ``"deepspeed"``:
            DeepSpeed's ``PipelineEngine`` (Megatron-DeepSpeed,
            as BLOOM and MT-NLG ran): 1F1B only, every send blocking and the two directions
            in series, the stage's own output all-gathered over TP before its backward, the
            DP reduction after the last backward; with bf16 its ``BF16_Optimizer`` casts and
            adds each micro-batch's bf16 weight gradients into an fp32 buffer and all-reduces
            that buffer (``steptime``'s module doc gives the sources).
    """

    seq_len: int
    global_batch: int
    mode: str = "full"
    lora_rank: int = 16
    attention: str = "flash"
    dropout: bool | None = None
    grad_bytes: int = 4
    dp_overlap: bool = True
    precision: str = "bf16"
    engine: str = "megatron"

    def __post_init__(self) -> None:
        for label in ("seq_len", "global_batch", "lora_rank", "grad_bytes"):
            value = getattr(self, label)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"{label} must be a positive integer, got {value!r}")
        if self.mode not in ("full", "lora"):
            raise PlanError(f"mode must be 'full' or 'lora', got {self.mode!r}")
        if self.attention not in ("flash", "unfused"):
            raise PlanError(f"attention must be 'flash' or 'unfused', got {self.attention!r}")
        if self.precision not in PRECISIONS:
            raise PlanError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.engine not in ENGINES:
            raise PlanError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")

    @property
    def bf16_grad_copy(self) -> bool:
        """Whether each micro-batch's bf16 weight gradients are copied into fp32 buffers
        (DeepSpeed's ``BF16_Optimizer``: full training on the DeepSpeed engine)."""
        return self.engine == "deepspeed" and self.mode == "full"

    def uses_dropout(self, model: ModelSpec) -> bool:
        """Whether the run applies dropout (its own setting, else the model's)."""
        return model.dropout if self.dropout is None else self.dropout


@dataclass(frozen=True)
class ParallelConfig:
    """One way to split the run over the cluster.

    Attributes:
        mesh: the tensor x pipeline x data split (:class:`stagewise.mesh.Mesh`); its
            ``dp_shard`` (FSDP) is ``dp_sharding="weights"``, set either way.
        num_chunks: chunks (virtual stages) per pipeline rank (v).
        micro_batch_size: sequences per micro-batch (b).
        recompute: ``none``, ``selective`` (attention core) or ``full`` (whole block).
        sequence_parallel: norms, dropout and residuals sharded over the TP group.
        dp_sharding: what the data-parallel replicas shard (:data:`DP_SHARDING`): ``none``,
            ``optimizer`` (ZeRO-1, Megatron's distributed optimizer), ``gradients`` (ZeRO-2)
            or ``weights`` (ZeRO-3, FSDP).
        schedule: a stagewise schedule name (``1f1b``, ``interleaved-1f1b``, ...).
        layer_split: how the layers split over the stages (:data:`LAYER_SPLITS`, see
            :func:`stage_layers`).

    Raises:
        PlanError: a size that is not a positive integer, an unknown recompute or sharding
            mode, or a mesh whose ``dp_shard`` disagrees with ``dp_sharding``.

    Example:
        >>> cfg = ParallelConfig(Mesh(pp=4, dp=2, tp=8), micro_batch_size=1)
        >>> cfg.tp, cfg.pp, cfg.dp, cfg.num_gpus
        (8, 4, 2, 64)
        >>> ParallelConfig.of(tp=2, pp=1, dp=4, dp_sharding="weights").mesh.text()
        'pp=1,fsdp=4,tp=2'
    """

    mesh: Mesh
    num_chunks: int = 1
    micro_batch_size: int = 1
    recompute: str = "none"
    sequence_parallel: bool = False
    dp_sharding: str = "none"
    schedule: str = "1f1b"
    layer_split: str = "balanced"

    def __post_init__(self) -> None:
        if self.layer_split not in LAYER_SPLITS:
            raise PlanError(
                f"layer_split must be one of {', '.join(LAYER_SPLITS)}, got {self.layer_split!r}"
            )
        if not isinstance(self.mesh, Mesh):
            raise PlanError(f"mesh must be a stagewise.mesh.Mesh, got {self.mesh!r}")
        for label in ("num_chunks", "micro_batch_size"):
            value = getattr(self, label)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"{label} must be a positive integer, got {value!r}")
        if self.recompute not in RECOMPUTE_MODES:
            raise PlanError(
                f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {self.recompute!r}"
            )
        if self.dp_sharding not in DP_SHARDING:
            raise PlanError(
                f"dp_sharding must be one of {', '.join(DP_SHARDING)}, got {self.dp_sharding!r}"
            )
        if self.mesh.dp_shard and self.dp_sharding == "none":
            object.__setattr__(self, "dp_sharding", "weights")
        elif self.mesh.dp_shard != (self.dp_sharding == "weights"):
            raise PlanError(
                f"mesh {self.mesh.text()} {'shards' if self.mesh.dp_shard else 'does not shard'}"
                f" weights over dp but dp_sharding={self.dp_sharding!r}: use fsdp= in the mesh "
                "exactly when dp_sharding is 'weights'"
            )

    @classmethod
    def of(cls, tp: int, pp: int, dp: int, **knobs: Any) -> ParallelConfig:
        """A configuration from the three sizes (``dp_sharding="weights"`` sets FSDP).

        Raises:
            PlanError: a size that is not an integer >= 1 (the mesh's ConfigError, as the
                planner's error), or a bad knob (see the class).
        """
        try:
            mesh = Mesh(pp=pp, dp=dp, tp=tp, dp_shard=knobs.get("dp_sharding") == "weights")
        except ConfigError as err:
            raise PlanError(f"{err}: give tp, pp and dp as positive integers") from None
        return cls(mesh, **knobs)

    @property
    def tp(self) -> int:
        """Tensor-parallel size (t)."""
        return self.mesh.tp

    @property
    def pp(self) -> int:
        """Pipeline ranks (p)."""
        return self.mesh.pp

    @property
    def dp(self) -> int:
        """Data-parallel replicas (d)."""
        return self.mesh.dp

    @property
    def num_gpus(self) -> int:
        """GPUs the configuration uses: t x p x d."""
        return self.mesh.world_size

    def shards(self, state: str) -> bool:
        """Whether ``state`` (``optimizer``, ``gradients`` or ``weights``) is sharded over dp."""
        return DP_SHARDING.index(self.dp_sharding) >= DP_SHARDING.index(state)

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
        """One line: ``TP=8 PP=4 DP=2 chunks=2 mbs=1 recompute=none SP zero-1 interleaved-1f1b``."""
        parts = [f"TP={self.tp}", f"PP={self.pp}", f"DP={self.dp}"]
        if self.num_chunks > 1:
            parts.append(f"chunks={self.num_chunks}")
        parts.append(f"mbs={self.micro_batch_size}")
        parts.append(f"recompute={self.recompute}")
        if self.sequence_parallel:
            parts.append("SP")
        if self.dp_sharding != "none":
            parts.append(_SHARDING_LABEL[self.dp_sharding])
        parts.append(self.schedule)
        if self.layer_split != "balanced":
            parts.append(f"{self.layer_split}-split")
        return " ".join(parts)


_SHARDING_LABEL = {"optimizer": "zero-1", "gradients": "zero-2", "weights": "fsdp"}


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
            "needs at least one layer; lower pp or num_chunks"
        )
    base, extra = divmod(num_layers, num_stages)
    counts = [base] * num_stages
    start = (num_stages - extra) // 2
    for i in range(start, start + extra):
        counts[i] += 1
    return tuple(counts)


def stage_slots(num_layers: int, split: str, chunks: int) -> int:
    """The most (virtual) stages ``split`` can give ``num_layers``: one layer each, or with
    virtual stages (``chunks`` > 1) and the ``edges`` split two more, the first holding only
    the embedding and the last only the head and loss."""
    return num_layers + (2 if split == "edges" and chunks > 1 else 0)


def stage_layers(
    num_layers: int, num_stages: int, split: str = "balanced", chunks: int = 1
) -> tuple[int, ...]:
    """Layers per (virtual) stage under ``split`` (:data:`LAYER_SPLITS`), ``chunks`` stages
    per pipeline rank.

    ``balanced`` is :func:`split_layers`. ``edges`` splits num_layers + 2 slots the same way
    and gives the first slot to the embedding and the last to the loss, so the first and the
    last stages hold one layer fewer than their share (Megatron-LM's account-for-embedding
    and account-for-loss split). With virtual stages a share of one slot leaves the first
    stage only the embedding and the last only the head and loss, as Llama 3 405B ran: 126
    layers + 2 over 16 ranks x 8 chunks (Grattafiori et al. 2024, sec. 3.3.2). A rank of
    one stage must hold a layer.

    Raises:
        PlanError: an unknown split, or a stage left with no layer (other than the first or
            last of several chunks per rank).

    Example:
        >>> stage_layers(80, 8), stage_layers(80, 8, "edges")
        ((10, 10, 10, 10, 10, 10, 10, 10), (9, 10, 10, 11, 11, 10, 10, 9))
        >>> stage_layers(126, 128, "edges", chunks=8)[:3]
        (0, 1, 1)
    """
    if split == "balanced":
        return split_layers(num_layers, num_stages)
    if split != "edges":
        raise PlanError(f"layer split must be one of {', '.join(LAYER_SPLITS)}, got {split!r}")
    if num_stages > num_layers + 2:
        raise PlanError(
            f"cannot split {num_layers} layers, the embedding and the loss over {num_stages} "
            "(virtual) stages: lower pp or num_chunks"
        )
    counts = list(split_layers(num_layers + 2, num_stages))
    counts[0] -= 1
    counts[-1] -= 1
    if chunks == 1 and min(counts) < 1:
        raise PlanError(
            f"the edges split of {num_layers} layers over {num_stages} stages leaves a stage "
            "with no layer: use layer_split='balanced' or fewer stages"
        )
    return tuple(counts)
