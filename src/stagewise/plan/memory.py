"""Memory per GPU: model states, activations (Korthikanti et al. 2022) and the rest.

Activations of one block for one micro-batch on one GPU of a TP group of t, in bytes
(b micro-batch, s sequence, h hidden, a heads, f MLP width, k the key/value width):

- replicated over TP unless sequence parallelism shards them: the two norms' inputs and
  outputs (8·s·b·h) and the two dropout masks (2·s·b·h, when the model uses dropout);
- sharded over TP: Q (2·s·b·h), K and V (4·s·b·k), the attention output (2·s·b·h), the MLP
  (4·s·b·f for GELU: its input and output; 6·s·b·f for SwiGLU: gate, up and their product);
- the attention core: unfused, the softmax output (2·a·s²·b) and with dropout its mask and
  output (3·a·s²·b); fused (flash) only the fp32 log-sum-exp (4·a·s·b).

For a GPT block (k = h, f = 4h, dropout, unfused) this is Korthikanti's
s·b·h·(10 + 24/t + 5·a·s/(h·t)), and s·b·h·34/t with sequence parallelism and selective
recomputation (which drops the attention core). Full recomputation keeps only each block's
input (2·s·b·h, sharded with sequence parallelism) and rebuilds one block at a time. With FP8
(Transformer Engine) the saved inputs of the GEMMs are FP8: the two norm outputs, the
attention output and the MLP's last activation take one byte per element instead of two.
With flash attention the attention output is kept twice under FP8: the flash kernel saves its
own bf16 output for its backward (2·s·b·h) and the output projection its FP8 copy (1·s·b·h),
3·s·b·h where bf16 keeps one 2·s·b·h tensor for both (Transformer Engine's ``DotProductAttention``
saves ``out`` in ``ctx.save_for_backward``; its ``Linear`` saves the FP8-cast input).

LoRA fine-tuning (``mode="lora"``) is what ``stagewise train --lora`` runs: Hugging Face blocks
with peft adapters (float32) on a frozen bf16 base under bf16 autocast. What that saves was
counted tensor by tensor with ``saved_tensors_hooks`` on a Llama block (``tests/
test_plan_lora_memory_fit.py`` repeats the count) and differs from the Megatron block above:

- the frozen base GEMMs save no input (their weight gradient is never needed); instead each
  adapted linear saves its own bf16 copy of its input (peft casts the input to the adapter's
  float32, autocast casts it back for the GEMM), so Q, K and V keep three copies of the norm
  output (2·s·b·h each), gate and up two more, the output projection and the MLP's down
  projection one each (2·s·b·q, 2·s·b·f; q = a x head_dim, h unless the heads say otherwise);
- each norm saves its fp32 input and 1/rms (4·s·b·h + 4·s·b: Hugging Face's RMSNorm upcasts
  to fp32; LayerNorm is counted the same, as CUDA autocast runs it in fp32);
- each adapter saves A·x (2·s·b·r) and autocast's bf16 casts of A and B (2 bytes per adapter
  parameter, made again every micro-batch);
- the MLP keeps gate, SiLU(gate) and up (6·s·b·f; GELU: its input, 2·s·b·f);
- attention: fused (PyTorch SDPA's flash kernel) keeps Q, K, V, its output and the fp32
  log-sum-exp; eager (``attention="unfused"``) keeps Q, and K and V repeated to every head
  (2·s·b·q each), the fp32 softmax (4·a·s²·b) and its bf16 copy (2·a·s²·b), with attention
  dropout its mask and output (3·a·s²·b);
- rotary models: each block recomputes its cos and sin (2 x 2·s·b·head_dim); with dropout, the
  two residual dropout masks (2·s·b·h, one byte each).

On the first stage the embedding is frozen, so the first block's input needs no gradient and
its first norm saves nothing (:func:`lora_first_norm_bytes` is what it does not save).
"""

from __future__ import annotations

from dataclasses import dataclass

from stagewise.plan.models import ModelSpec
from stagewise.plan.spec import ParallelConfig, TrainingSpec

__all__ = [
    "GIB",
    "MemoryBreakdown",
    "adapter_extra_weight_bytes",
    "layer_activation_bytes",
    "layer_state_bytes_per_param",
    "lora_first_norm_bytes",
    "lora_params_per_block",
]

GIB = float(1 << 30)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one GPU (the most loaded one of the plan), by part.

    Attributes:
        weights: parameters held (bf16; LoRA: frozen base plus adapters).
        gradients: gradient buffers (fp32 main grads by default).
        optimizer: Adam state and fp32 master weights (sharded over DP when distributed).
        activations: stored activations of the micro-batches in flight at the peak, from the
            schedule's timeline (embedding and final-norm outputs included on their stages).
        logits: the last stage's output logits and their fp32 softmax for one micro-batch.
        recompute_buffer: one block's full activations while full recomputation rebuilds it.
        comm_buffers: pipeline send/receive buffers and the sequence-parallel gather buffer.
        reserved: CUDA context and library workspaces, plus the share of device memory
            left free for allocator fragmentation (constants ``reserved_gib``,
            ``fragmentation``).
        rank: the pipeline rank these figures belong to.
    """

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    recompute_buffer: float
    comm_buffers: float
    reserved: float
    rank: int = 0

    @property
    def total(self) -> float:
        return (
            self.weights + self.gradients + self.optimizer + self.activations + self.logits
            + self.recompute_buffer + self.comm_buffers + self.reserved
        )

    @property
    def model_states(self) -> float:
        """Weights, gradients and optimizer state."""
        return self.weights + self.gradients + self.optimizer

    def in_gib(self) -> dict[str, float]:
        """Every part and the total, in GiB."""
        parts = {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "logits": self.logits,
            "recompute_buffer": self.recompute_buffer,
            "comm_buffers": self.comm_buffers,
            "reserved": self.reserved,
            "total": self.total,
        }
        return {name: value / GIB for name, value in parts.items()}


def layer_activation_bytes(
    model: ModelSpec,
    training: TrainingSpec,
    config: ParallelConfig,
    recompute: str | None = None,
) -> float:
    """Bytes one block stores for one micro-batch on one GPU (see the module docstring).

    Example:
        >>> from stagewise.plan.models import get_model
        >>> gpt = get_model("gpt-22b")
        >>> run = TrainingSpec(seq_len=2048, global_batch=4, attention="unfused")
        >>> cfg = ParallelConfig.of(tp=8, pp=1, dp=1, micro_batch_size=4)
        >>> sbh = 2048 * 4 * 6144
        >>> korthikanti = 10 + 24 / 8 + 5 * 64 * 2048 / (6144 * 8)
        >>> round(layer_activation_bytes(gpt, run, cfg) / sbh / korthikanti, 12)
        1.0
    """
    mode = config.recompute if recompute is None else recompute
    b, s, t = config.micro_batch_size, training.seq_len, config.tp
    h, f = model.hidden, model.ffn
    sbh = s * b * h
    shard = t if config.sequence_parallel else 1
    if mode == "full":
        return 2.0 * sbh / shard
    if training.mode == "lora":
        return _lora_block_bytes(model, training, config, mode)
    dropout = training.uses_dropout(model)
    # FP8 keeps the GEMM inputs it saves for the weight gradients in one byte: both norm
    # outputs, the attention output and the MLP's last activation.
    fp8 = 1 if training.precision == "fp8" else 0
    replicated = (8 - 2 * fp8 + (2 if dropout else 0)) * sbh
    mlp = ((6 if model.mlp == "swiglu" else 4) - fp8) * s * b * f
    # The attention output: one bf16 tensor read by both backwards; under FP8 the projection
    # keeps its FP8 copy, and with flash the kernel also keeps its own bf16 output.
    sbq = s * b * model.q_dim  # the query and the attention output are heads x head_dim wide
    attention_out = (2 - fp8 + (2 * fp8 if training.attention == "flash" else 0)) * sbq
    sliced = 2 * sbq + 4 * s * b * model.kv_dim + attention_out + mlp  # Q, K and V, out, MLP
    if training.attention == "flash":
        core = 4.0 * model.heads * s * b
    elif mode == "selective":
        core = 0.0
    else:
        core = (2 + (3 if dropout else 0)) * model.heads * s * s * b
    return replicated / shard + (sliced + core) / t


def lora_params_per_block(model: ModelSpec, lora_rank: int) -> int:
    """Adapter parameters of one block: r x (in + out) for Q, K, V, O and the MLP matrices."""
    h, q, k, f = model.hidden, model.q_dim, model.kv_dim, model.ffn
    attention = (h + q) + 2 * (h + k) + (q + h)
    mlp = (model.mlp_matrices - 1) * (h + f) + (f + h)
    return lora_rank * (attention + mlp)


def _lora_block_bytes(
    model: ModelSpec, training: TrainingSpec, config: ParallelConfig, mode: str
) -> float:
    """One block's saved bytes under peft LoRA on a Hugging Face block (module docstring)."""
    b, s, t = config.micro_batch_size, training.seq_len, config.tp
    h, k, f, a, r = model.hidden, model.kv_dim, model.ffn, model.heads, training.lora_rank
    sb, sbh, sbq = s * b, s * b * h, s * b * model.q_dim
    shard = t if config.sequence_parallel else 1
    column_inputs = 3 + model.mlp_matrices - 1  # Q, K, V and the MLP's up (and gate)
    adapters = 4 + model.mlp_matrices
    dropout = training.uses_dropout(model)
    replicated = 2 * (4 * sbh + 4 * sb) + column_inputs * 2 * sbh + (2 * sbh if dropout else 0)
    if model.position == "rope":
        replicated += 2 * 2 * sb * model.head_dim
    unsharded = adapters * 2 * sb * r  # A·x: the adapter rank is not split over TP
    mlp = (6 if model.mlp == "swiglu" else 2) * sb * f
    sliced = 2 * sbq + 2 * sb * f + mlp + 2.0 * lora_params_per_block(model, r)
    if training.attention == "flash":
        core = 2 * sbq + 4 * sb * k + 2 * sbq + 4 * a * sb
    else:
        core = 3 * 2 * sbq
        if mode != "selective":
            core += (4 + 2 + (3 if dropout else 0)) * a * s * s * b
    return replicated / shard + unsharded + (sliced + core) / t


def lora_first_norm_bytes(
    model: ModelSpec, training: TrainingSpec, config: ParallelConfig
) -> float:
    """The fp32 input and 1/rms one LoRA block's first norm saves (module docstring)."""
    sb = config.micro_batch_size * training.seq_len
    shard = config.tp if config.sequence_parallel else 1
    return (4.0 * sb * model.hidden + 4.0 * sb) / shard


def layer_state_bytes_per_param(
    training: TrainingSpec, config: ParallelConfig
) -> tuple[float, float, float]:
    """(weight, gradient, optimizer) bytes per trainable parameter on one GPU.

    bf16 weights (2), fp32 main gradients (``grad_bytes``, 4), and Adam's fp32 master weights,
    first and second moments (12): Megatron's 18 bytes (DeepSpeed's bf16 optimizer, which
    keeps the bf16 gradients beside its fp32 buffer: 20). Each part is divided by dp when the
    replicas shard it (``config.dp_sharding``): ZeRO-1 (Megatron's distributed optimizer)
    gives 6 + 12/d (Megatron-LM ``docs/distrib_optimizer.md``), ZeRO-2 2 + 16/d, FSDP 18/d
    (the gathered weights of the blocks being computed are counted separately).

    LoRA: the adapters are float32 (peft's ``autocast_adapter_dtype`` casts them up on a bf16
    base, and ``stagewise train --lora`` keeps them so), so they are their own master weights
    and AdamW keeps only its two fp32 moments (8); the adapters' other 2 weight bytes are
    :func:`adapter_extra_weight_bytes`. The weight figure here (2) is also what every frozen
    base parameter takes.
    """
    d = config.dp
    weights = 2.0 / (d if config.shards("weights") else 1)
    gradients = float(training.grad_bytes) / (d if config.shards("gradients") else 1)
    if training.bf16_grad_copy:  # DeepSpeed's bf16 optimizer: the bf16 gradients beside
        gradients += 2.0  # its unsharded fp32 buffer
    moments = 8.0 if training.mode == "lora" else 12.0
    optimizer = moments / (d if config.shards("optimizer") else 1)
    return weights, gradients, optimizer


def adapter_extra_weight_bytes(training: TrainingSpec, config: ParallelConfig) -> float:
    """Bytes per LoRA adapter parameter beyond the 2 of a bf16 weight (fp32 adapters), else 0."""
    if training.mode != "lora":
        return 0.0
    return 2.0 / (config.dp if config.shards("weights") else 1)
