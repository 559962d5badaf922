"""Per-stage costs and sizes of a plan: layers, the embedding, the head, and stage boundaries.

Ranks are laid out as Megatron-LM does: TP innermost, then DP, then PP, so pipeline rank r's
first GPU is r x t x d and a stage boundary crosses nodes when the two ranks' GPUs lie in
different nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from stagewise.plan.comm import all_gather_time, all_reduce_time, p2p_time
from stagewise.plan.constants import Constants
from stagewise.plan.hardware import Cluster
from stagewise.plan.layer import BYTES, LayerSetup, LayerTime, gemm_time
from stagewise.plan.models import ModelSpec
from stagewise.plan.spec import ParallelConfig, TrainingSpec

__all__ = [
    "LOSS_BACKWARD_BYTES", "LOSS_BYTES", "LOSS_FORWARD_BYTES", "LOSS_LAUNCHES", "EdgeTime",
    "edge_times", "hop_parts",
    "node_of_rank", "stage_costs",
]

# HBM bytes per logit (per vocabulary entry of the TP shard, per token) that Megatron-LM's
# vocabulary-parallel cross-entropy moves (megatron/core/tensor_parallel/cross_entropy.py,
# VocabParallelCrossEntropy), kernel by kernel. Forward: upcast the bf16 logits to fp32
# (read 2, write 4), the max over the vocabulary (read 4), subtract it in place (read 4,
# write 4), exp in place (4 + 4), the sum (read 4), divide by the sum in place into the
# softmax saved for the backward (4 + 4): 38. Backward: subtract one at the target (one
# element per token, not counted), scale the saved softmax by the loss gradient in place
# (4 + 4), and the upcast's backward casts the fp32 gradient to bf16 (read 4, write 2): 14.
# The per-token scalars (max, sum, target logit, loss) and their all-reduces are left out.
LOSS_FORWARD_BYTES = (2 + 4) + 4 + (4 + 4) + (4 + 4) + 4 + (4 + 4)
LOSS_BACKWARD_BYTES = (4 + 4) + (4 + 2)
# PyTorch's ``F.cross_entropy`` (log_softmax, then nll_loss) under bf16 autocast, which runs it
# in fp32 (aten/src/ATen/native/cuda/SoftMax.cu, LossNLL.cu). Forward: autocast's upcast
# (read 2, write 4), one log-softmax kernel reading each row and writing its log-probabilities
# (4 + 4; the kernel's max and sum passes re-read the row it holds in shared memory or L2):
# 14. Backward: nll_loss's zero-filled gradient (write 4), one log-softmax backward reading
# that gradient and the saved output and writing the input gradient (4 + 4 + 4), the upcast's
# backward (read 4, write 2): 22.
PYTORCH_LOSS_FORWARD_BYTES = (2 + 4) + (4 + 4)
PYTORCH_LOSS_BACKWARD_BYTES = 4 + (4 + 4 + 4) + (4 + 2)
LOSS_BYTES = {
    "megatron": (LOSS_FORWARD_BYTES, LOSS_BACKWARD_BYTES),
    "deepspeed": (LOSS_FORWARD_BYTES, LOSS_BACKWARD_BYTES),  # Megatron-DeepSpeed's loss
    "pytorch": (PYTORCH_LOSS_FORWARD_BYTES, PYTORCH_LOSS_BACKWARD_BYTES),
}
"""(forward, backward) HBM bytes per logit of the loss each engine runs."""
LOSS_LAUNCHES = {"megatron": (6, 2), "deepspeed": (6, 2), "pytorch": (3, 4)}
"""(forward, backward) kernels of each engine's loss: Megatron's six and two above; PyTorch's
upcast, log-softmax and nll_loss, then the zero fill, nll_loss's scatter, the log-softmax
backward and the cast."""


@dataclass(frozen=True)
class EdgeTime:
    """Forward, backward and weight-gradient seconds of the embedding or of the head."""

    forward: float
    backward: float
    weight: float


def edge_times(
    model: ModelSpec,
    cluster: Cluster,
    training: TrainingSpec,
    config: ParallelConfig,
    setup: LayerSetup,
    c: Constants,
) -> tuple[EdgeTime, EdgeTime]:
    """(embedding, head) costs for one micro-batch on one GPU of the TP group.

    The head is the final norm, the vocabulary-parallel output GEMM and the fp32 cross-entropy
    over b·s x V/t logits (:data:`LOSS_BYTES` per logit for the engine's loss, over HBM
    bandwidth, one launch per kernel); with TP the head's input is gathered
    (sequence parallel) or its gradient all-reduced, and the embedding's output all-reduced
    (or reduce-scattered).
    """
    gpu, t = cluster.gpu, config.tp
    tokens = config.micro_batch_size * training.seq_len
    vocab = model.padded_vocab(t) / t
    hbm = gpu.hbm_bandwidth * c.hbm_efficiency
    size = BYTES * tokens * model.hidden
    shard = t if config.sequence_parallel else 1
    bandwidth = setup.tp_bandwidth or gpu.nvlink_bandwidth
    lora = training.mode == "lora"
    if config.sequence_parallel:
        tp_in = tp_back = tp_embed = all_gather_time(size, t, bandwidth, c)
    else:
        tp_in, tp_back = 0.0, all_reduce_time(size, t, bandwidth, c)
        tp_embed = all_reduce_time(size, t, bandwidth, c)
    head_gemm = gemm_time(tokens, vocab, model.hidden, gpu, c)
    head_dgrad = gemm_time(tokens, model.hidden, vocab, gpu, c)
    head_wgrad = 0.0 if lora else gemm_time(model.hidden, vocab, tokens, gpu, c)
    logits = tokens * vocab
    norm_bytes = 4.0 * tokens * model.hidden / shard
    loss_forward, loss_backward = LOSS_BYTES[training.engine]
    launches_forward, launches_backward = LOSS_LAUNCHES[training.engine]
    # Launches: the norm's and the loss's, each way.
    head = EdgeTime(
        forward=head_gemm + tp_in + (loss_forward * logits + norm_bytes) / hbm
        + (1 + launches_forward) * c.kernel_overhead_s,
        backward=head_dgrad + head_wgrad + tp_back
        + (loss_backward * logits + 2 * norm_bytes) / hbm
        + (1 + launches_backward) * c.kernel_overhead_s,
        weight=head_wgrad,
    )
    lookup = 2.0 * size / hbm + c.kernel_overhead_s
    embed = EdgeTime(
        forward=lookup + tp_embed,
        backward=(0.0 if lora else 2.0 * lookup) + tp_embed,
        weight=0.0 if lora else 2.0 * lookup,
    )
    return embed, head


def node_of_rank(cluster: Cluster, config: ParallelConfig, rank: int) -> int:
    """Node holding the first GPU of pipeline rank ``rank``."""
    return rank * config.tp * config.dp // cluster.gpus_per_node


def hop_parts(
    model: ModelSpec,
    cluster: Cluster,
    training: TrainingSpec,
    config: ParallelConfig,
    placement: tuple[int, ...],
    c: Constants,
) -> tuple[list[float], float]:
    """(transfer seconds over each stage boundary, the receiver's TP all-gather seconds).

    Each GPU of the TP group sends its 1/t share of the b·s·h activation or gradient
    (Megatron's scatter/gather, DeepSpeed's partitioned tensors; with sequence parallelism
    the tensor is already sharded) over its own NIC when the boundary crosses nodes, over
    NVLink otherwise; without sequence parallelism the receiver all-gathers the shares over
    NVLink. The last stage sends nothing, nor a stage to the next one on its own rank.
    """
    t = config.tp
    size = BYTES * config.micro_batch_size * training.seq_len * model.hidden
    gpu = cluster.gpu
    regather = 0.0
    if not config.sequence_parallel:
        regather = all_gather_time(size, t, gpu.nvlink_bandwidth, c)
    sends = []
    for stage in range(len(placement)):
        if stage == len(placement) - 1 or placement[stage] == placement[stage + 1]:
            sends.append(0.0)
            continue
        crosses = node_of_rank(cluster, config, placement[stage]) != node_of_rank(
            cluster, config, placement[stage + 1]
        )
        bandwidth = gpu.network_bandwidth if crosses else gpu.nvlink_bandwidth
        sends.append(p2p_time(size / t, bandwidth, c))
    return sends, regather


def stage_costs(
    layers: tuple[int, ...],
    block: LayerTime,
    embed: EdgeTime,
    head: EdgeTime,
) -> tuple[list[float], list[float], list[float]]:
    """(forward, backward, weight-gradient) seconds of one micro-batch through each stage."""
    last = len(layers) - 1
    forward, backward, weight = [], [], []
    for stage, count in enumerate(layers):
        f, b, w = count * block.forward, count * block.backward, count * block.weight_grad
        if stage == 0:
            f, b, w = f + embed.forward, b + embed.backward, w + embed.weight
        if stage == last:
            f, b, w = f + head.forward, b + head.backward, w + head.weight
        forward.append(f)
        backward.append(b)
        weight.append(w)
    return forward, backward, weight
