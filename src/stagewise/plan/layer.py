"""Time of one transformer block on one GPU of a TP group: GEMMs, attention, element-wise, TP.

Every kernel is timed from the hardware table and the global constants (``constants.py``):

- GEMMs by output tiles, waves over the SMs, split-K and the HBM roofline
  (:func:`stagewise.plan.kernels.gemm_time`); with FP8 the block's GEMMs run at the FP8
  peak on one-byte operands, and every GEMM input (forward) and output gradient (backward)
  is cast first: read bf16, write FP8 and its transpose (4 bytes per element).
- Attention core: ``flash`` runs the causal half of the 4·b·s²·(a/t)·d FLOPs, d the head width
  padded to the kernel's (FlashAttention-2 compiles 32, 64, 96, 128, 160, 192, 256), at
  ``flash_efficiency`` of the GEMM rate at long sequences, quantised to waves of b·(a/t)·s/128
  query blocks, and at a share of that at shorter ones (each query block's fixed cost and the
  causal diagonal, :func:`stagewise.plan.kernels.flash_block_share`; backward 2.5x the forward
  FLOPs: it recomputes the scores, at ``flash_backward_share`` of the forward's rate);
  ``unfused`` runs two batched GEMMs with K or N = head_dim plus softmax (and dropout) kernels
  over the b·(a/t)·s² scores, bandwidth-bound.
- Element-wise kernels (norms, residual adds with dropout, activation, rotary) move the bytes
  Megatron's fused kernels read and write (:func:`elementwise_bytes`) at ``hbm_efficiency`` of
  HBM bandwidth. Without sequence parallelism the norms and residuals are replicated on every
  TP rank.
- TP collectives: without sequence parallelism two all-reduces of the b·s·h activation in the
  forward and two in the backward; with it, all-gathers and reduce-scatters of the same total
  volume, plus two more all-gathers in the backward: the sharded inputs are gathered again
  for the weight-gradient GEMMs. The forward's are exposed. In the backward, Megatron's
  column-parallel linears (fused QKV, MLP up) overlap their collectives with their own GEMMs
  (``LinearWithGradAccumulationAndAsyncCommunication``; Korthikanti et al. 2022, sec. 4.2.2):
  the input gradient's all-reduce (or reduce-scatter) runs during the weight-gradient GEMM, and
  with sequence parallelism the input's re-gather during the input-gradient GEMM; only what
  outlasts its GEMM is exposed. The row-parallel linears' backward collectives (the output
  gradient's all-gather with sequence parallelism) come before their GEMMs: exposed.
  ``Constants.tp_overlap`` says which overlap runs: ``"backward"`` (the above), ``"none"``
  (everything exposed), or ``"all"``: Transformer Engine's userbuffers with sequence
  parallelism also split each forward gather / reduce-scatter and each row-parallel
  output-gradient gather into chunks run with their linear's GEMM, so every collective is
  exposed only by what outlasts its GEMM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stagewise.plan.comm import all_gather_time, all_reduce_time
from stagewise.plan.constants import DEFAULT_CONSTANTS, Constants
from stagewise.plan.hardware import GpuSpec
from stagewise.plan.kernels import (
    attention_waves,
    elementwise_time,
    flash_block_share,
    flash_head_dim,
    gemm_rate,
    gemm_time,
)
from stagewise.plan.models import ModelSpec

# gemm_time: see kernels
__all__ = ["LayerSetup", "LayerTime", "block_time", "elementwise_bytes", "gemm_time"]

BYTES = 2  # bf16 activations and weights


@dataclass(frozen=True)
class LayerSetup:
    """How one block runs: the TP slice, the micro-batch, and the recipe."""

    tp: int
    micro_batch_size: int
    seq_len: int
    recompute: str = "none"
    sequence_parallel: bool = False
    attention: str = "flash"
    dropout: bool = False
    lora_rank: int | None = None
    tp_bandwidth: float | None = None  # bytes/s each way; None: the GPU's NVLink
    fp8: bool = False  # the block's GEMMs in FP8 (Transformer Engine style)


@dataclass(frozen=True)
class LayerTime:
    """Seconds of one block's forward and backward on one GPU, by part.

    ``backward`` includes ``recompute`` (the forward work recomputation repeats);
    ``weight_grad`` is the part of the backward that computes weight gradients (the W op of
    split-backward schedules).
    """

    forward_gemm: float
    forward_attention: float
    forward_elementwise: float
    forward_tp_comm: float
    backward_gemm: float
    backward_attention: float
    backward_elementwise: float
    backward_tp_comm: float
    recompute: float
    weight_grad: float

    @property
    def forward(self) -> float:
        return (
            self.forward_gemm + self.forward_attention + self.forward_elementwise
            + self.forward_tp_comm
        )

    @property
    def backward(self) -> float:
        return (
            self.backward_gemm + self.backward_attention + self.backward_elementwise
            + self.backward_tp_comm + self.recompute
        )

    @property
    def tp_comm(self) -> float:
        return self.forward_tp_comm + self.backward_tp_comm


def _gemm_shapes(model: ModelSpec, tokens: int, tp: int) -> list[tuple[float, float, float]]:
    """(M, N, K) of the block's forward GEMMs on one TP rank."""
    h, q, f = model.hidden, model.q_dim, model.ffn
    return [
        (tokens, (q + 2 * model.kv_dim) / tp, h),  # fused QKV
        (tokens, h, q / tp),  # attention output projection
        (tokens, (model.mlp_matrices - 1) * f / tp, h),  # up (and gate, fused)
        (tokens, h, f / tp),  # down
    ]


def _gemms(
    model: ModelSpec, setup: LayerSetup, gpu: GpuSpec, c: Constants
) -> list[tuple[float, float, float]]:
    """(forward, input-gradient, weight-gradient) GEMM seconds of each of the block's four
    linears (in ``_gemm_shapes``' order), LoRA adapters included."""
    tokens = setup.micro_batch_size * setup.seq_len
    fp8 = setup.fp8
    linears = []
    for m, n, k in _gemm_shapes(model, tokens, setup.tp):
        forward = gemm_time(m, n, k, gpu, c, fp8=fp8)
        dgrad = gemm_time(m, k, n, gpu, c, fp8=fp8)
        wgrad = 0.0
        if fp8:  # cast the input (forward) and the output gradient (backward) to FP8
            forward += elementwise_time(4.0 * m * k, 1, gpu, c)
            dgrad += elementwise_time(4.0 * m * n, 1, gpu, c)
        if setup.lora_rank is None:
            wgrad = gemm_time(k, n, m, gpu, c, fp8=fp8)
        else:
            r = setup.lora_rank
            for am, an, ak in ((m, r, k), (m, n, r)):  # x A, then (x A) B
                forward += gemm_time(am, an, ak, gpu, c)
                dgrad += gemm_time(am, ak, an, gpu, c)
                wgrad += gemm_time(ak, an, am, gpu, c)
        linears.append((forward, dgrad, wgrad))
    return linears


def _attention(
    model: ModelSpec, setup: LayerSetup, gpu: GpuSpec, c: Constants
) -> tuple[float, float]:
    """(forward, backward) seconds of the attention core (scores, softmax, scores x V)."""
    b, s, t = setup.micro_batch_size, setup.seq_len, setup.tp
    heads = model.heads / t
    if setup.attention == "flash":
        # the matrix products run over the kernel's head width (kernels.flash_head_dim)
        flops = 4.0 * b * s * s * heads * flash_head_dim(model.head_dim) * 0.5
        waves = attention_waves(b * heads * math.ceil(s / c.gemm_tile), gpu)
        rate = gemm_rate(gpu, c) * c.flash_efficiency / waves
        forward = flops / (rate * flash_block_share(s, c.flash_forward_block_overhead,
                                                    c.gemm_tile))
        backward = 2.5 * flops / (rate * c.flash_backward_share * flash_block_share(
            s, c.flash_backward_block_overhead, c.gemm_tile))
        return forward + c.kernel_overhead_s, backward + 2 * c.kernel_overhead_s
    dh, batch = model.head_dim, max(1, round(b * heads))
    scores = gemm_time(s, s, dh, gpu, c, batch) + gemm_time(s, dh, s, gpu, c, batch)
    elements = b * heads * s * s
    forward_bytes = elements * (4 + (5 if setup.dropout else 0))
    backward_bytes = elements * (6 + (5 if setup.dropout else 0))
    kernels = 2 if setup.dropout else 1
    forward = scores + elementwise_time(forward_bytes, kernels, gpu, c)
    backward = 2 * scores + elementwise_time(backward_bytes, kernels, gpu, c)
    return forward, backward


def elementwise_bytes(model: ModelSpec, setup: LayerSetup) -> tuple[float, float]:
    """(forward, backward) HBM bytes of one block's memory-bound kernels on one GPU.

    Megatron-LM's fused kernels in bf16, per token, with h the hidden size (divided by t with
    sequence parallelism: the norms and residuals are then sharded), f the MLP width, q and
    kv the query and key/value widths (all three divided by t):

    - norm: forward reads x and writes its output (4h); backward reads x and dy, writes dx
      (6h); two per block;
    - residual add (fused with dropout when the model has it): forward reads two inputs,
      writes one (6h, +1h mask); backward adds the branch's input gradient to the residual
      gradient (6h; dropout's backward reads the mask: +5h); two per block;
    - activation: SwiGLU reads gate and up, writes their product (6f; backward reads dy,
      gate and up, writes both gradients: 10f); bias-GeLU reads and writes f (4f; backward
      reads dy and x, writes dx: 6f);
    - rotary embedding (RoPE models): reads and writes q and k (4(q + kv)), both ways.
    """
    tokens = setup.micro_batch_size * setup.seq_len
    t = setup.tp
    h = model.hidden / (t if setup.sequence_parallel else 1)
    f = model.ffn / t
    mask = 1.0 if setup.dropout else 0.0
    forward = 2 * 4 * h + 2 * (6 + mask) * h
    backward = 2 * 6 * h + 2 * (6 + 5 * mask) * h
    if model.mlp == "swiglu":
        forward, backward = forward + 6 * f, backward + 10 * f
    else:
        forward, backward = forward + 4 * f, backward + 6 * f
    if model.position == "rope":
        rotary = 4 * (model.q_dim + model.kv_dim) / t
        forward, backward = forward + rotary, backward + rotary
    return tokens * forward, tokens * backward


def _elementwise(
    model: ModelSpec, setup: LayerSetup, gpu: GpuSpec, c: Constants
) -> tuple[float, float]:
    """(forward, backward) seconds of the block's memory-bound kernels."""
    forward, backward = elementwise_bytes(model, setup)
    kernels = 5 + (1 if model.position == "rope" else 0)
    return elementwise_time(forward, kernels, gpu, c), elementwise_time(backward, kernels, gpu, c)


COLUMN_PARALLEL = (0, 2)  # fused QKV and MLP up: their backward overlaps its collectives
ROW_PARALLEL = (1, 3)  # attention output and MLP down


def _hidden(comm: float, gemm: float) -> float:
    """What of a collective outlasts the GEMM it overlaps."""
    return max(0.0, comm - gemm)


def _tp_comm(
    model: ModelSpec, setup: LayerSetup, gpu: GpuSpec, c: Constants,
    linears: list[tuple[float, float, float]],
) -> tuple[float, float]:
    """Exposed seconds of the TP collectives of one (forward, backward); ``linears`` are the
    (forward, dgrad, wgrad) GEMM seconds of the four linears that collectives overlap."""
    t = setup.tp
    if t == 1:
        return 0.0, 0.0
    size = BYTES * setup.micro_batch_size * setup.seq_len * model.hidden
    bandwidth = setup.tp_bandwidth or gpu.nvlink_bandwidth
    if not setup.sequence_parallel:
        reduce = all_reduce_time(size, t, bandwidth, c)
        if c.tp_overlap == "none":
            return 2 * reduce, 2 * reduce
        return 2 * reduce, sum(_hidden(reduce, linears[i][2]) for i in COLUMN_PARALLEL)
    gather = all_gather_time(size, t, bandwidth, c)  # = one reduce-scatter
    if c.tp_overlap == "none":
        return 4 * gather, 6 * gather
    backward = sum(_hidden(gather, linears[i][1]) + _hidden(gather, linears[i][2])
                   for i in COLUMN_PARALLEL)
    if c.tp_overlap == "backward":  # the row-parallel output-gradient gathers come first
        return 4 * gather, backward + 2 * gather
    # userbuffers: every input gather / output reduce-scatter runs in chunks with its GEMM
    forward = sum(_hidden(gather, linears[i][0]) for i in (*COLUMN_PARALLEL, *ROW_PARALLEL))
    backward += sum(_hidden(gather, linears[i][1]) for i in ROW_PARALLEL)
    return forward, backward


def block_time(
    model: ModelSpec, gpu: GpuSpec, setup: LayerSetup, c: Constants = DEFAULT_CONSTANTS
) -> LayerTime:
    """Time of one transformer block's forward and backward on one GPU of its TP group."""
    linears = _gemms(model, setup, gpu, c)
    gemm_f, gemm_d, gemm_w = (sum(times) for times in zip(*linears, strict=True))
    attn_f, attn_b = _attention(model, setup, gpu, c)
    elem_f, elem_b = _elementwise(model, setup, gpu, c)
    comm_f, comm_b = _tp_comm(model, setup, gpu, c, linears)
    forward = gemm_f + attn_f + elem_f + comm_f
    if setup.recompute == "full":
        recompute = forward
    elif setup.recompute == "selective" and setup.attention == "unfused":
        recompute = attn_f
    else:
        recompute = 0.0
    return LayerTime(
        forward_gemm=gemm_f,
        forward_attention=attn_f,
        forward_elementwise=elem_f,
        forward_tp_comm=comm_f,
        backward_gemm=gemm_d + gemm_w,
        backward_attention=attn_b,
        backward_elementwise=elem_b,
        backward_tp_comm=comm_b,
        recompute=recompute,
        weight_grad=gemm_w,
    )
