"""``layer_time``: the planner's prediction for one transformer block, to compare with a GPU."""

from __future__ import annotations

from stagewise.errors import PlanError
from stagewise.plan.constants import DEFAULT_CONSTANTS, Constants
from stagewise.plan.hardware import GpuSpec, get_gpu
from stagewise.plan.kernels import gemm_peak
from stagewise.plan.layer import LayerSetup, block_time
from stagewise.plan.models import ModelSpec, get_model
from stagewise.plan.spec import PRECISIONS, RECOMPUTE_MODES

__all__ = ["layer_time"]


def layer_time(
    model: ModelSpec | str,
    gpu: GpuSpec | str,
    tp: int,
    micro_batch_size: int,
    seq_len: int,
    *,
    include_comm: bool = True,
    recompute: str = "none",
    sequence_parallel: bool = False,
    attention: str = "flash",
    constants: Constants = DEFAULT_CONSTANTS,
    precision: str = "bf16",
) -> tuple[float, float]:
    """Predicted (forward_s, backward_s) of ONE transformer block on ONE GPU of a TP group.

    What is timed: the block's TP slice on one GPU, i.e. the block with heads/tp query heads,
    kv_heads/tp key/value heads and ffn/tp MLP width (hidden size unchanged), for one
    micro-batch of ``micro_batch_size`` x ``seq_len`` tokens, in BF16:

    - forward_s: the GEMMs (fused QKV, attention output, MLP up/gate, MLP down), the attention
      core (``flash``: causal fused kernel; ``unfused``: score GEMMs + softmax), the
      element-wise kernels (two norms, two residual adds, the activation, rotary embedding
      for RoPE models, dropout when the model uses it) and, when ``include_comm`` and
      ``tp > 1``, the TP collectives of the forward on NVLink (two all-reduces of the
      b x s x h bf16 activation; with ``sequence_parallel`` two all-gathers and two
      reduce-scatters, norms and residuals then sharded).
    - backward_s: input- and weight-gradient GEMMs, the attention backward, element-wise
      backward (``layer.elementwise_bytes``), when ``include_comm`` the backward's TP
      collectives less what the column-parallel linears' GEMMs hide (``layer``'s module
      doc), plus what ``recompute`` repeats (``full``: the whole forward;
      ``selective``: the attention core, nothing with flash attention).

    Not included: embedding, output head and loss, optimizer, pipeline transfers, DP
    reduction, the pipeline bubble, Python/framework overhead between kernels beyond a fixed
    per-kernel launch cost. With ``include_comm=False`` this is what one GPU measures when it
    runs the sliced block alone (no process group).

    Args:
        model: a :class:`ModelSpec` or a catalog name (``"llama-2-70b"``).
        gpu: a :class:`GpuSpec` or a catalog name/alias (``"h100"``).
        tp: tensor-parallel size; must divide the model's kv_heads and ffn.
        micro_batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        include_comm: add the TP collectives (0 for tp == 1).
        recompute: ``none``, ``selective`` or ``full`` (adds recomputation to backward_s).
        sequence_parallel: Megatron sequence parallelism.
        attention: ``flash`` or ``unfused``.
        constants: the planner's global constants.
        precision: ``bf16``, or ``fp8`` (the block GEMMs in FP8, their inputs cast first).

    Raises:
        PlanError: unknown model or GPU, a tp that does not divide the heads or the MLP, an
            unknown recompute or attention mode, FP8 on a GPU without FP8 tensor cores.

    Example:
        >>> fwd, bwd = layer_time("llama-2-70b", "h100", tp=8, micro_batch_size=1, seq_len=4096)
        >>> 0 < fwd < bwd
        True
    """
    spec = get_model(model) if isinstance(model, str) else model
    device = get_gpu(gpu) if isinstance(gpu, str) else gpu
    _check(spec, tp, recompute, attention)
    if precision not in PRECISIONS:
        raise PlanError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    gemm_peak(device, fp8=precision == "fp8")  # refuses FP8 where the GPU has none
    setup = LayerSetup(
        tp=tp,
        micro_batch_size=micro_batch_size,
        seq_len=seq_len,
        recompute=recompute,
        sequence_parallel=sequence_parallel and tp > 1,
        attention=attention,
        dropout=spec.dropout,
        tp_bandwidth=device.nvlink_bandwidth,
        fp8=precision == "fp8",
    )
    block = block_time(spec, device, setup, constants)
    comm_f = block.forward_tp_comm if include_comm else 0.0
    comm_b = block.backward_tp_comm if include_comm else 0.0
    forward = block.forward - block.forward_tp_comm + comm_f
    recompute_comm = block.forward_tp_comm if recompute == "full" else 0.0
    backward = block.backward - block.backward_tp_comm - recompute_comm
    if include_comm:
        backward += comm_b + recompute_comm
    return forward, backward


def _check(spec: ModelSpec, tp: int, recompute: str, attention: str) -> None:
    """Raise PlanError for a tp that does not divide the block, or an unknown mode."""
    if tp < 1 or spec.heads % tp or spec.kv_heads % tp or spec.ffn % tp:
        raise PlanError(
            f"tp={tp} does not divide {spec.name}'s {spec.heads} heads, {spec.kv_heads} "
            f"key/value heads and MLP width {spec.ffn}: choose a tp that divides {spec.kv_heads}"
        )
    if recompute not in RECOMPUTE_MODES or attention not in ("flash", "unfused"):
        raise PlanError(
            f"recompute must be one of {', '.join(RECOMPUTE_MODES)} and attention 'flash' or "
            f"'unfused', got {recompute!r} and {attention!r}"
        )
