"""The planner's few global constants, each a physical quantity, none tied to one case.

They are the same for every model, GPU and plan; what differs between GPUs (peaks, SMs,
bandwidths) is in the hardware table (``data/gpus.json``). Only ``matmul_efficiency`` is
fitted to published runs, and ``benchmarks/planner_accuracy.py`` fits it leaving each source
out (``benchmarks/data``); the others come from the hardware and library behaviour named
beside them. Measuring a GEMM table and one block on the target GPU
(``benchmarks/gpu_layer.py``) and comparing with ``layer_time`` is the way to refine them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_CONSTANTS", "Constants"]


@dataclass(frozen=True)
class Constants:
    """Efficiencies, overheads and memory reserves.

    Attributes:
        matmul_efficiency: share of its dense peak one SM sustains on a full output tile
            (clocks under load, instruction and synchronisation overheads); fitted to
            published runs leaving each source out (cuBLAS reaches 0.7-0.85 on large GEMMs).
        fp8_efficiency: an FP8 GEMM's efficiency relative to a BF16 GEMM of the same shape
            (scaling, power limits: on H100 FP8 GEMMs run 1.4-1.65x, not 2x, faster than
            BF16 at training shapes, vLLM pull 49363's H100 table); 0.75 is a 1.5x speed-up.
        gemm_tile: edge of a GEMM output tile in elements (cuBLAS and CUTLASS BF16 and FP8
            kernels on sm80 and sm90 use 128-wide tiles): the unit of tile and wave
            quantisation (``kernels.gemm_time``).
        tile_k_overhead: K elements an output tile costs on top of K: the K loop's
            prologue (filling the shared-memory pipeline, 2-4 stages of 64) and epilogue
            (writing the tile out).
        flash_efficiency: fused attention's rate relative to a large GEMM (softmax and
            masking inside the kernel; FlashAttention-2 reports 50-73 % of A100 peak).
        hbm_efficiency: share of HBM bandwidth an element-wise kernel sustains.
        kernel_overhead_s: launch and tail time of one kernel.
        link_efficiency: bus bandwidth NCCL reaches as a share of the link bandwidth
            (NVLink or the NICs), for large messages.
        collective_latency_s: time per ring step of a collective (synchronisation, small
            message latency).
        p2p_latency_s: fixed time of one pipeline send/receive between nodes.
        reserved_gib: memory the run cannot use: CUDA context, cuBLAS and NCCL workspaces.
        fragmentation: share of device memory lost to the caching allocator's fragmentation
            and short-lived peaks; a plan must leave it free.
    """

    matmul_efficiency: float = 0.75
    fp8_efficiency: float = 0.75
    gemm_tile: int = 128
    tile_k_overhead: float = 128.0
    flash_efficiency: float = 0.75
    hbm_efficiency: float = 0.80
    kernel_overhead_s: float = 4e-6
    link_efficiency: float = 0.80
    collective_latency_s: float = 8e-6
    p2p_latency_s: float = 20e-6
    reserved_gib: float = 1.0
    fragmentation: float = 0.05


DEFAULT_CONSTANTS = Constants()
