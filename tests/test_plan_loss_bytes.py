"""The head's cross-entropy costs the bytes Megatron-LM's vocabulary-parallel loss moves.

Counted by hand, kernel by kernel, from megatron/core/tensor_parallel/cross_entropy.py
(VocabParallelCrossEntropy): per logit of the TP shard, the forward upcasts the bf16 logits to
fp32, takes the max, subtracts it, exponentiates, sums and divides into the saved softmax;
the backward scales the softmax by the loss gradient and casts the gradient back to bf16.
"""

from __future__ import annotations

import pytest

from stagewise.plan import ParallelConfig, TrainingSpec, get_gpu, get_model
from stagewise.plan.constants import DEFAULT_CONSTANTS as C
from stagewise.plan.hardware import Cluster
from stagewise.plan.layer import LayerSetup, gemm_time
from stagewise.plan.stages import (
    LOSS_BACKWARD_BYTES,
    LOSS_BYTES,
    LOSS_FORWARD_BYTES,
    LOSS_LAUNCHES,
    edge_times,
)

# (bytes read, bytes written) per logit of each kernel, fp32 = 4, bf16 = 2.
FORWARD_KERNELS = {
    "upcast bf16 -> fp32": (2, 4),
    "max over the vocabulary": (4, 0),
    "subtract the max (in place)": (4, 4),
    "exp (in place)": (4, 4),
    "sum of exp": (4, 0),
    "divide by the sum: the saved softmax": (4, 4),
}
BACKWARD_KERNELS = {
    "softmax x loss gradient (in place)": (4, 4),
    "fp32 gradient -> bf16 (the upcast's backward)": (4, 2),
}


def test_loss_bytes_per_logit_are_the_kernels_counted_by_hand() -> None:
    assert sum(map(sum, FORWARD_KERNELS.values())) == LOSS_FORWARD_BYTES == 38
    assert sum(map(sum, BACKWARD_KERNELS.values())) == LOSS_BACKWARD_BYTES == 14


def test_head_time_charges_the_loss_bytes_over_hbm_bandwidth() -> None:
    # One GPU, no TP (no collectives): the head is the final norm, the output GEMM (and its
    # two backward GEMMs) and the loss; each kernel one launch.
    model, gpu = get_model("llama-2-7b"), get_gpu("h100")
    s, b = 4096, 1
    tokens, vocab, h = s * b, model.padded_vocab(1), model.hidden
    training = TrainingSpec(seq_len=s, global_batch=8)
    config = ParallelConfig.of(tp=1, pp=2, dp=4, micro_batch_size=b)
    setup = LayerSetup(tp=1, micro_batch_size=b, seq_len=s)
    _, head = edge_times(model, Cluster(gpu, 1, 8), training, config, setup, C)
    hbm = gpu.hbm_bandwidth * C.hbm_efficiency
    norm = 4.0 * tokens * h  # the final RMSNorm: read and write bf16
    forward = (gemm_time(tokens, vocab, h, gpu, C) + (38 * tokens * vocab + norm) / hbm
               + (1 + 6) * C.kernel_overhead_s)
    wgrad = gemm_time(h, vocab, tokens, gpu, C)
    backward = (gemm_time(tokens, h, vocab, gpu, C) + wgrad
                + (14 * tokens * vocab + 2 * norm) / hbm + (1 + 2) * C.kernel_overhead_s)
    assert head.forward == pytest.approx(forward, rel=1e-12)
    assert head.backward == pytest.approx(backward, rel=1e-12)
    assert head.weight == pytest.approx(wgrad, rel=1e-12)


# PyTorch's F.cross_entropy under bf16 autocast (fp32): (bytes read, bytes written) per logit
PYTORCH_FORWARD_KERNELS = {
    "autocast upcast bf16 -> fp32": (2, 4),
    "log_softmax (its max and sum passes re-read the row on chip)": (4, 4),
    "nll_loss (one element per token)": (0, 0),
}
PYTORCH_BACKWARD_KERNELS = {
    "nll_loss backward: zero-filled gradient": (0, 4),
    "nll_loss backward: -1 at each target (one element per token)": (0, 0),
    "log_softmax backward: gradient and saved output in, input gradient out": (8, 4),
    "fp32 gradient -> bf16 (the upcast's backward)": (4, 2),
}


def test_the_pytorch_engine_times_pytorchs_own_cross_entropy() -> None:
    assert LOSS_BYTES["pytorch"] == (
        sum(map(sum, PYTORCH_FORWARD_KERNELS.values())),
        sum(map(sum, PYTORCH_BACKWARD_KERNELS.values())),
    ) == (14, 22)
    assert LOSS_LAUNCHES["pytorch"] == (len(PYTORCH_FORWARD_KERNELS),
                                        len(PYTORCH_BACKWARD_KERNELS))
    # Same run on both engines: the heads differ by the loss's bytes and launches only.
    model, gpu = get_model("llama-2-7b"), get_gpu("h100")
    s, b = 4096, 2
    logits = s * b * model.padded_vocab(1)
    config = ParallelConfig.of(tp=1, pp=2, dp=4, micro_batch_size=b)
    setup = LayerSetup(tp=1, micro_batch_size=b, seq_len=s)
    heads = {}
    for engine in ("megatron", "pytorch"):
        training = TrainingSpec(seq_len=s, global_batch=16, engine=engine)
        heads[engine] = edge_times(model, Cluster(gpu, 1, 8), training, config, setup, C)[1]
    hbm = gpu.hbm_bandwidth * C.hbm_efficiency
    megatron, pytorch = heads["megatron"], heads["pytorch"]
    assert megatron.forward - pytorch.forward == pytest.approx(
        (38 - 14) * logits / hbm + (6 - 3) * C.kernel_overhead_s, rel=1e-9)
    assert pytorch.backward - megatron.backward == pytest.approx(
        (22 - 14) * logits / hbm + (4 - 2) * C.kernel_overhead_s, rel=1e-9)
    assert pytorch.weight == megatron.weight
