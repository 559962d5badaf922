"""Kernel times on one GPU: GEMMs by tiles and waves, memory-bound kernels by bytes.

A GEMM (m x k) @ (k x n) is cut into output tiles of ``gemm_tile`` x ``gemm_tile``
(cuBLAS and CUTLASS BF16/FP8 kernels on sm80/sm90 use 128-wide tiles); the tiles run on the
GPU's streaming multiprocessors in waves, so a GEMM with 1.1 waves of tiles takes as long as
one with 2. Each SM computes its tile at ``matmul_efficiency`` of its share of the GPU's
achievable GEMM rate (``GpuSpec.gemm_flops``: the best large-GEMM throughput measured with
cuBLAS, about 80-87 % of the datasheet peak, cited in ``data/gpus.json``) for its ``k``
elements, plus ``tile_overhead_s`` (the K loop's prologue and epilogue: loading the first
stages, writing the tile out; a latency, so the same time whatever the SM's rate: 1.4 us
fitted to cuBLAS's rates by shape on H100, ``benchmarks/gemm_shape_fit.py``). When there are
fewer tiles than SMs the K dimension is split over the idle SMs (split-K), at the price of
writing and reading the fp32 partial sums.
Then the roofline: a GEMM can never run faster than its operands and result move through HBM
at ``hbm_efficiency`` of the bandwidth. Thin tensor-parallel slices (n or k = h/t) and short
token counts (m = b·s) therefore lose efficiency, and tiny GEMMs become memory-bound.

FP8 GEMMs (Transformer Engine style) run at ``fp8_efficiency`` x ``matmul_efficiency`` of the
GPU's measured FP8 GEMM rate (1.77x the BF16 one on H100, not the datasheet's 2x), read one-byte
operands and write bf16 results. Only the K loop runs faster: a tile's prologue and its bf16
write-out take the same ``tile_overhead_s``.
"""

from __future__ import annotations

import math

from stagewise.errors import PlanError
from stagewise.plan.constants import Constants
from stagewise.plan.hardware import GpuSpec

__all__ = [
    "FLASH_HEAD_DIMS", "attention_waves", "elementwise_time", "flash_block_share",
    "flash_head_dim", "gemm_peak", "gemm_rate",
    "gemm_time",
]

OUT_BYTES = 2  # GEMM results are written in bf16
PARTIAL_BYTES = 4  # split-K partial sums are fp32
MIN_SPLIT_K = 256  # split-K keeps at least this many K elements per split


def gemm_peak(gpu: GpuSpec, fp8: bool) -> float:
    """The dense tensor-core peak a GEMM runs against (FP8 or BF16), FLOP/s.

    Raises:
        PlanError: FP8 on a GPU without FP8 tensor cores.
    """
    if not fp8:
        return gpu.peak_flops
    if not gpu.has_fp8:
        raise PlanError(
            f"{gpu.name} has no FP8 tensor cores: use --precision bf16, or an H100, H200 or "
            "B200"
        )
    return gpu.fp8_peak_flops


def gemm_rate(gpu: GpuSpec, c: Constants, fp8: bool = False) -> float:
    """FLOP/s of the whole GPU on full output tiles: the measured GEMM rate x the efficiencies.

    Raises:
        PlanError: FP8 on a GPU without FP8 tensor cores.
    """
    gemm_peak(gpu, fp8)  # refuses FP8 where the GPU has none
    efficiency = c.matmul_efficiency * (c.fp8_efficiency if fp8 else 1.0)
    return gpu.achievable_gemm_flops(fp8) * efficiency


def gemm_time(
    m: float, n: float, k: float, gpu: GpuSpec, c: Constants, batch: int = 1,
    fp8: bool = False,
) -> float:
    """Seconds of ``batch`` GEMMs of (m x k) @ (k x n) in one kernel (see the module doc)."""
    tile = c.gemm_tile
    tiles = batch * math.ceil(m / tile) * math.ceil(n / tile)
    per_sm = gemm_rate(gpu, c, fp8) / gpu.sms
    splits = 1
    if tiles < gpu.sms:
        splits = max(1, min(gpu.sms // tiles, int(k // MIN_SPLIT_K)))
    waves = math.ceil(tiles * splits / gpu.sms)
    compute = waves * (2.0 * tile * tile * k / splits / per_sm + c.tile_overhead_s)
    operand = 1 if fp8 else 2
    moved = batch * (operand * (m * k + k * n) + OUT_BYTES * m * n)
    if splits > 1:
        moved += 2 * batch * PARTIAL_BYTES * m * n * splits
    memory = moved / (gpu.hbm_bandwidth * c.hbm_efficiency)
    return max(compute, memory) + c.kernel_overhead_s


def flash_block_share(seq_len: int, overhead_blocks: float, block: int, causal: bool = True
                      ) -> float:
    """The share of a fused attention kernel's long-sequence rate it reaches at ``seq_len``.

    Each query block of ``block`` rows loops over its key blocks and costs ``overhead_blocks``
    key blocks' time on top (loading its queries, the softmax's last rescale, writing its
    output and log-sum-exp). Without a mask every query block visits all n = s / block key
    blocks: n / (n + overhead). With the causal mask the counted FLOPs are half of the n^2
    blocks, but query block i visits i + 1 of them, the diagonal one whole: n / (n + 1 +
    2 overhead). Short sequences therefore run far below the long-sequence rate. A sequence
    that is not a multiple of ``block`` counts its last, partial block as a whole one.
    """
    n = max(1.0, math.ceil(seq_len / block))
    if causal:
        return n / (n + 1.0 + 2.0 * overhead_blocks)
    return n / (n + overhead_blocks)


FLASH_HEAD_DIMS = (32, 64, 96, 128, 160, 192, 256)
"""Head widths FlashAttention-2 compiles kernels for (``HEADDIM_SWITCH`` in its
``csrc/flash_attn/src/static_switch.h``): a head runs in the narrowest that holds it, its
matrix products over the whole width (an 80-wide head costs what a 96-wide one does)."""


def flash_head_dim(head_dim: int) -> int:
    """The width a fused attention kernel computes over for heads ``head_dim`` wide: the
    narrowest of :data:`FLASH_HEAD_DIMS` that holds it; past 256 (no such kernel: PyTorch falls
    back to another), the width itself rounded up to a multiple of 32.

    Example:
        >>> flash_head_dim(80), flash_head_dim(128), flash_head_dim(112), flash_head_dim(300)
        (96, 128, 128, 320)
    """
    for width in FLASH_HEAD_DIMS:
        if head_dim <= width:
            return width
    return -(-head_dim // 32) * 32


def attention_waves(blocks: float, gpu: GpuSpec) -> float:
    """Wave quantisation of a fused attention kernel of ``blocks`` thread blocks (>= 1)."""
    if blocks <= 0:
        return 1.0
    return math.ceil(blocks / gpu.sms) / (blocks / gpu.sms)


def elementwise_time(num_bytes: float, kernels: int, gpu: GpuSpec, c: Constants) -> float:
    """Memory-bound kernels moving ``num_bytes`` through HBM, plus their launches."""
    return num_bytes / (gpu.hbm_bandwidth * c.hbm_efficiency) + kernels * c.kernel_overhead_s
