"""FLOP counts, named, so every TFLOP/s and MFU figure says which count it divides.

Model FLOPs (what MFU divides) follow Korthikanti et al. 2022, eq. 7, generalised to grouped-
query attention and SwiGLU: per token, forward = 2 x (matmul weights of all blocks)
+ 4·L·s·h (attention scores and scores x values over the full, non-causal s x s square; h is
the query width a x head_dim, the model width unless the heads are wider or narrower)
+ 2·h·V (the output head); a training step is 3x forward (backward is twice the forward).
For GPT shapes (12h² weights per block, f = 4h) this is exactly
72·B·L·s·h²·(1 + s/6h + V/12hL) per step. LoRA fine-tuning computes no weight gradients of the
frozen base, so its step is 2x forward (forward and input gradients; the adapters' own FLOPs,
under 1 % at ranks up to 64, are left out).

Hardware FLOPs (HFU) add what recomputation runs again: the whole forward of every block for
``full``, the attention scores and scores x values for ``selective`` (Korthikanti eq. 8 for full).
"""

from __future__ import annotations

from stagewise.plan.models import ModelSpec

__all__ = [
    "MODEL_FLOPS_NAME",
    "hardware_flops_per_token",
    "lower_bound_flops_per_token",
    "model_flops_per_token",
]

MODEL_FLOPS_NAME = (
    "model FLOPs, Korthikanti et al. 2022 eq. 7 generalised: "
    "3 x (2·matmul weights + 4·L·s·h non-causal attention + 2·h·V head) per token "
    "(2 x for LoRA: no weight gradients of the frozen base)"
)


def _forward_per_token(
    model: ModelSpec, seq_len: int, causal: bool = False
) -> tuple[float, float]:
    """(block FLOPs, head FLOPs) of one token's forward pass."""
    attention = 4.0 * seq_len * model.q_dim * (0.5 if causal else 1.0)
    blocks = model.layers * (2.0 * model.layer_matmul_params + attention)
    head = 2.0 * model.hidden * model.vocab
    return blocks, head


def _passes(mode: str) -> float:
    """Forward-pass equivalents per training step: 3 (forward, two backward GEMMs), 2 (LoRA)."""
    return 2.0 if mode == "lora" else 3.0


def model_flops_per_token(model: ModelSpec, seq_len: int, mode: str = "full") -> float:
    """Model FLOPs of one training token (forward + backward), see the module docstring.

    Example:
        >>> from stagewise.plan.models import ModelSpec
        >>> gpt = ModelSpec("g", layers=1, hidden=64, heads=1, kv_heads=1, ffn=256,
        ...                 vocab=100, mlp="gelu")
        >>> eq7 = 72 * 64**2 * (1 + 32 / (6 * 64) + 100 / (12 * 64))
        >>> round(model_flops_per_token(gpt, seq_len=32) / eq7, 12)
        1.0
    """
    blocks, head = _forward_per_token(model, seq_len)
    return _passes(mode) * (blocks + head)


def hardware_flops_per_token(
    model: ModelSpec, seq_len: int, recompute: str, mode: str = "full"
) -> float:
    """FLOPs the GPUs actually run per token, recomputation included (HFU numerator)."""
    blocks, head = _forward_per_token(model, seq_len)
    extra = 0.0
    if recompute == "full":
        extra = blocks
    elif recompute == "selective":
        extra = model.layers * 4.0 * seq_len * model.q_dim
    return _passes(mode) * (blocks + head) + extra


def lower_bound_flops_per_token(model: ModelSpec, seq_len: int, mode: str = "full") -> float:
    """The fewest FLOPs training can do per token: matmuls, causal attention, no recompute."""
    blocks, head = _forward_per_token(model, seq_len, causal=True)
    return _passes(mode) * (blocks + head)
