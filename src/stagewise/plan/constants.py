"""The planner's few global constants, each a physical quantity, none tied to one case.

They are the same for every model, GPU and plan; what differs between GPUs (peaks, measured
GEMM rates, SMs, bandwidths) is in the hardware table (``data/gpus.json``). Only
``matmul_efficiency`` (and ``fp8_efficiency`` where FP8 runs exist) is fitted to published
runs, and ``benchmarks/planner_accuracy.py`` fits it leaving each source out
(``benchmarks/data``); the shipped value is the fit on all sources. The others come from the
hardware and library behaviour named beside them. Measuring a GEMM table and one block on the
target GPU (``benchmarks/gpu_layer.py``) and comparing with ``layer_time`` is the way to refine
them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_CONSTANTS", "Constants"]


@dataclass(frozen=True)
class Constants:
    """Efficiencies, overheads and memory reserves.

    Attributes:
        matmul_efficiency: share of the GPU's measured large-GEMM rate (``gemm_tflops`` in
            ``data/gpus.json``: cuBLAS on an idle GPU, 80-87 % of the peak) one SM sustains
            on a full output tile inside a training step (clocks under sustained power,
            GEMMs sharing the GPU with communication kernels); fitted to published runs
            leaving each source out.
        fp8_efficiency: an FP8 GEMM's share of the measured FP8 rate relative to the BF16
            share ``matmul_efficiency`` (the measured rates already hold FP8's 1.77x, not
            2x, on H100); 1.0 ships: no published FP8 source other than the one scored, so
            nothing to fit it on without that source (the benchmark fits it where it can).
        gemm_tile: edge of a GEMM output tile in elements (cuBLAS and CUTLASS BF16 and FP8
            kernels on sm80 and sm90 use 128-wide tiles): the unit of tile and wave
            quantisation (``kernels.gemm_time``).
        tile_k_overhead: K elements an output tile costs on top of K: the K loop's
            prologue (filling the shared-memory pipeline, 2-4 stages of 64) and epilogue
            (writing the tile out).
        flash_efficiency: fused attention's rate relative to the sustained large-GEMM rate
            (softmax and masking inside the kernel; FlashAttention-2 reports 50-73 % of
            A100 peak).
        hbm_efficiency: share of HBM bandwidth an element-wise kernel sustains.
        kernel_overhead_s: launch and tail time of one kernel.
        link_efficiency: bus bandwidth NCCL reaches as a share of the link bandwidth
            (NVLink or the NICs), for large messages.
        collective_latency_s: time per ring step of a collective (synchronisation, small
            message latency).
        p2p_latency_s: fixed time of one pipeline send/receive between nodes.
        tp_backward_overlap: the backward of a column-parallel linear overlaps its TP
            collectives with its own GEMMs (Megatron-LM's asynchronous all-reduce and
            sequence-parallel gather, since late 2021; ``layer``'s module doc). False for
            the Megatron-LM of early 2021 (Narayanan et al.), whose backward all-reduces
            were synchronous.
        reserved_gib: memory the run cannot use: CUDA context, cuBLAS and NCCL workspaces.
        fragmentation: share of device memory lost to the caching allocator's fragmentation
            and short-lived peaks; a plan must leave it free.
    """

    matmul_efficiency: float = 0.82
    fp8_efficiency: float = 1.0
    gemm_tile: int = 128
    tile_k_overhead: float = 128.0
    flash_efficiency: float = 0.75
    hbm_efficiency: float = 0.80
    kernel_overhead_s: float = 4e-6
    link_efficiency: float = 0.80
    collective_latency_s: float = 8e-6
    p2p_latency_s: float = 20e-6
    tp_backward_overlap: bool = True
    reserved_gib: float = 1.0
    fragmentation: float = 0.05


DEFAULT_CONSTANTS = Constants()
