"""The planner's few global constants, each a physical quantity, none tied to one case.

They are the same for every model, GPU and plan. Values come from physical reasoning and
vendor/NCCL behaviour, not from fitting: with them the published Megatron-LM runs in
``benchmarks/data/calibration_runs.json`` are predicted to a median 2.2 % (worst 8.1 %) step
time error (``benchmarks/planner_accuracy.py``), and moving any one constant by a sizeable
step (matmul efficiency to 0.70 or 0.85, tile overhead to 32 or 128, link efficiency to 0.7,
HBM efficiency to 0.6) keeps the median error within 7.5 % and the worst within 15 %.
``matmul_efficiency`` = 0.75 sits between A100 (large cuBLAS GEMMs reach ~0.8 of 312
TFLOP/s) and H100 SXM (~0.7-0.75 of 989 TFLOP/s under its power limit); measuring one
block on the target GPU and comparing with ``layer_time`` is the way to refine it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_CONSTANTS", "Constants"]


@dataclass(frozen=True)
class Constants:
    """Efficiencies, overheads and memory reserves.

    Attributes:
        matmul_efficiency: share of the dense peak a large BF16 GEMM sustains (cuBLAS on
            big square-ish shapes; clocks under load, instruction overheads).
        tile_overhead: elements a GEMM dimension costs on top of its size: partly filled
            tiles, the prologue/epilogue of the K loop and the last partial wave, averaged.
            A GEMM of M x N x K runs as (M + d)(N + d)(K + d) at full efficiency, so thin TP
            slices (N or K = h/t) and small micro-batches (M = b s) lose efficiency.
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
    tile_overhead: float = 64.0
    flash_efficiency: float = 0.75
    hbm_efficiency: float = 0.80
    kernel_overhead_s: float = 4e-6
    link_efficiency: float = 0.80
    collective_latency_s: float = 8e-6
    p2p_latency_s: float = 20e-6
    reserved_gib: float = 1.0
    fragmentation: float = 0.05


DEFAULT_CONSTANTS = Constants()
