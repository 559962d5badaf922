"""The planner's few global constants, each a physical quantity, none tied to one case.

They are the same for every model, GPU and plan; what differs between GPUs (peaks, measured
GEMM rates, SMs, bandwidths) is in the hardware table (``data/gpus.json``). Only
``matmul_efficiency`` and ``fp8_efficiency`` are fitted to published runs, and
``benchmarks/planner_accuracy.py`` fits them leaving each source out (``benchmarks/data``);
the shipped values are their fit on every source (0.80 / 1.04, each the value that leaves the
runs' median signed error nearest zero, every source weighing the same); README's accuracy
section. GEMM
rates are the GPU's sustained ones (``GpuSpec.sustained_share``: H100 and H200 lose about
9.5 % of their burst rate at the 700 W limit). The others come from
the hardware and library behaviour named beside them. Measuring a GEMM table and one block on the
target GPU (``benchmarks/gpu_layer.py``) and comparing with ``layer_time`` is the way to refine
them.
"""

from __future__ import annotations

from dataclasses import dataclass

from stagewise.errors import PlanError

__all__ = ["DEFAULT_CONSTANTS", "TP_OVERLAPS", "Constants"]

TP_OVERLAPS = ("none", "backward", "all")


@dataclass(frozen=True)
class Constants:
    """Efficiencies, overheads and memory reserves.

    Attributes:
        matmul_efficiency: share of the GPU's sustained large-GEMM rate (``gemm_tflops`` x
            ``sustained_share`` in ``data/gpus.json``: cuBLAS, 80-87 % of the peak in a burst,
            about 9.5 % less on H100/H200 saturated at their power limit) one SM sustains
            on a full output tile inside a training step (clocks under sustained power,
            GEMMs sharing the GPU with communication kernels); fitted to published runs
            leaving each source out.
        fp8_efficiency: an FP8 GEMM's share of the measured FP8 rate relative to the BF16
            share ``matmul_efficiency`` (the measured rates already hold FP8's 1.77x, not
            2x, on H100; both are scaled by the same ``sustained_share``); fitted on the FP8
            runs of NeMo's tables and LLM Foundry's FP8 gain over its BF16 runs: 1.04 (the
            prior, 1.00, is FP8 keeping the same share of its sustained rate as BF16).
        gemm_tile: edge of a GEMM output tile in elements (cuBLAS and CUTLASS BF16 and FP8
            kernels on sm80 and sm90 use 128-wide tiles): the unit of tile and wave
            quantisation (``kernels.gemm_time``).
        tile_overhead_s: seconds an output tile costs on top of its K loop: the loop's
            prologue (filling the shared-memory pipeline) and epilogue (writing the tile
            out), a latency the same for BF16 and FP8. Fitted to cuBLAS's BF16 rates by
            shape on H100 (OpenXLA's sm_90 matmul table, M, N, K from 256 to 4096:
            ``benchmarks/gemm_shape_fit.py``, data in ``benchmarks/data/gemm_shapes.json``)
            and used on every GPU: no per-shape table for A100 or others was found.
        flash_efficiency: fused attention's forward rate at long sequences, causal, relative
            to the sustained large-GEMM rate: FlashAttention-2 reaches 230 TFLOP/s forward on
            A100 at its best (Dao 2023, sec. 4: 73 % of the peak), about 0.93 of that with the
            causal mask (its H100 curves, causal 345 against 372 TFLOP/s at 16k): 214 over
            the planner's A100 GEMM rate (271.2 x 0.80 = 217), 0.99 (on H100, 0.99 x 575 =
            569 TFLOP/s, between cuDNN's and FlashAttention-3's published causal rates, 540
            and 616).
        flash_forward_block_overhead, flash_backward_block_overhead: a query block's fixed
            cost in the forward and the backward, in key blocks' time
            (:func:`stagewise.plan.kernels.flash_block_share`): fitted to FlashAttention-2's
            published H100 rates by sequence length (``benchmarks/attention_fit.py``, data in
            ``benchmarks/data/attention_rates.json``): the forward on two curves (head dim 128
            and 64), the backward on one (head dim 128).
        flash_backward_share: the fused attention backward's rate as a share of its
            forward's (FlashAttention-2, Dao 2023: up to 73 % of A100 peak forward, 63 %
            backward; 63 / 73).
        hbm_efficiency: share of HBM bandwidth an element-wise kernel sustains.
        kernel_overhead_s: launch and tail time of one kernel.
        link_efficiency: bus bandwidth NCCL reaches as a share of the link bandwidth
            (NVLink or the NICs), for large messages.
        collective_latency_s: time per ring step of a collective (synchronisation, small
            message latency).
        p2p_latency_s: fixed time of one pipeline send/receive between nodes.
        tp_overlap: which TP collectives hide behind GEMMs (``layer``'s module doc):
            ``"backward"``, Megatron-LM's own since late 2021 (the column-parallel linears'
            backward overlaps its asynchronous all-reduce, or sequence-parallel gather and
            reduce-scatter, with its GEMMs); ``"all"``, Transformer Engine's userbuffers
            with sequence parallelism (NeMo's performance recipes: every forward and
            backward collective split and overlapped with its linear's GEMM); ``"none"``,
            the Megatron-LM of early 2021 (Narayanan et al.), synchronous.
        param_gather_overlap: whether the distributed optimizer's parameter all-gather runs
            bucket by bucket during the next step's first forward (Megatron-LM's
            ``--overlap-param-gather``, NeMo's ``overlap_param_sync``; off by default in
            Megatron-LM): then only what outlasts one micro-batch's forward through the rank's
            layers is exposed, and at least one layer's bucket (``steptime``).
        reserved_gib: memory the run cannot use: CUDA context, cuBLAS and NCCL workspaces.
        fragmentation: share of device memory a plan must leave free for the caching
            allocator's fragmentation and short-lived peaks. 0 by default: no published
            figure gives it, and Llama 3 405B ran 8K tokens without recomputation at 16 x 8
            virtual stages where the modelled bytes (weights, states, activations, the
            reserve) come to 78.0 of an H100's 79.6 GiB, so the 5 % once charged here was
            more than a tuned stack loses. Plans within ``--memory-margin-gib`` (2 GiB by
            default) of the limit are flagged at risk instead; that Llama 3 layout is.
    """

    matmul_efficiency: float = 0.80
    fp8_efficiency: float = 1.04
    gemm_tile: int = 128
    tile_overhead_s: float = 1.4e-6
    flash_efficiency: float = 0.99
    flash_forward_block_overhead: float = 0.7
    flash_backward_block_overhead: float = 2.15
    flash_backward_share: float = 0.86
    hbm_efficiency: float = 0.80
    kernel_overhead_s: float = 4e-6
    link_efficiency: float = 0.80
    collective_latency_s: float = 8e-6
    p2p_latency_s: float = 20e-6
    tp_overlap: str = "backward"
    param_gather_overlap: bool = False
    reserved_gib: float = 1.0
    fragmentation: float = 0.0


    def __post_init__(self) -> None:
        if self.tp_overlap not in TP_OVERLAPS:
            raise PlanError(
                f"tp_overlap must be one of {', '.join(TP_OVERLAPS)}, got {self.tp_overlap!r}"
            )


DEFAULT_CONSTANTS = Constants()
