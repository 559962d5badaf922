"""A tiny GPT-style language model as a list of layers, and data it can learn, generated here.

Used by the demo (``stagewise train``), the tests and the benchmark. The layers are an embedding
(tokens plus positions), pre-norm transformer blocks (causal self-attention, MLP) and a head
(norm plus vocabulary projection), so a partitioner can cut it anywhere between layers.

The data: each sequence counts upward from a random token by a step drawn from a few values,
modulo the vocabulary. After seeing two tokens the next is determined, so the loss falls from
about ln(vocab) towards zero within a few dozen steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from stagewise.runtime.parallel.tensor_parallel import BlockPlan

__all__ = ["GPTConfig", "gpt_layers", "lm_loss", "make_batch", "tp_plan"]


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of the tiny GPT.

    Attributes:
        vocab: vocabulary size.
        seq_len: longest sequence (positions embedded).
        dim: model width.
        heads: attention heads (divides ``dim``).
        layers: transformer blocks.
    """

    vocab: int = 64
    seq_len: int = 32
    dim: int = 64
    heads: int = 4
    layers: int = 4


class Embedding(nn.Module):
    """Token plus learned position embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(config.vocab, config.dim)
        self.positions = nn.Embedding(config.seq_len, config.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        out: torch.Tensor = self.tokens(ids) + self.positions(positions)
        return out


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x MLP, both residual."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(config.dim)
        # Separate projections (not one fused 3 * dim Linear) so tensor parallelism can give
        # each rank whole heads of q, k and v (see ``tensor_parallel``).
        self.q = nn.Linear(config.dim, config.dim)
        self.k = nn.Linear(config.dim, config.dim)
        self.v = nn.Linear(config.dim, config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, 4 * config.dim), nn.GELU(), nn.Linear(4 * config.dim, config.dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        head_dim = dim // self.heads
        normed = self.norm1(x)
        # -1 heads: under tensor parallelism each rank holds only its own heads.
        shape = (batch, length, -1, head_dim)
        q, k, v = (proj(normed).view(shape).transpose(1, 2) for proj in (self.q, self.k, self.v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
        mask = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        attention = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, length, -1)
        x = x + self.proj(mixed)
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class Head(nn.Module):
    """Final norm and projection to vocabulary logits."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.dim)
        self.out = nn.Linear(config.dim, config.vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(self.norm(x))
        return out


def gpt_layers(config: GPTConfig, seed: int = 0) -> list[nn.Module]:
    """The model as layers: embedding, ``config.layers`` blocks, head (same weights per seed).

    The caller's random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [Embedding(config), *(Block(config) for _ in range(config.layers)), Head(config)]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of next-token logits, mean over every token of the batch."""
    return functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def make_batch(
    config: GPTConfig, batch_size: int, generator: torch.Generator, seq_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each ``(batch_size, seq_len)`` int64 (see module doc)."""
    length = seq_len or config.seq_len
    start = torch.randint(0, config.vocab, (batch_size, 1), generator=generator)
    step = torch.randint(1, 4, (batch_size, 1), generator=generator)
    sequence = (start + step * torch.arange(length + 1)) % config.vocab
    return sequence[:, :-1].contiguous(), sequence[:, 1:].contiguous()


def tp_plan(module: nn.Module) -> BlockPlan | None:
    """The tiny GPT's tensor-parallel plan: a :class:`Block` shards q/k/v and the first MLP
    matmul column-wise, ``proj`` and the last MLP matmul row-wise (None for other layers)."""
    if not isinstance(module, Block):
        return None
    hidden = module.mlp[0]
    assert isinstance(hidden, nn.Linear)
    return BlockPlan(
        styles={"norm1": "shared", "q": "colwise", "k": "colwise", "v": "colwise",
                "proj": "rowwise", "mlp.0": "colwise", "mlp.2": "rowwise"},
        divisible=(("attention heads", module.heads, "GPTConfig(heads=...)"),
                   ("MLP width", hidden.out_features, "GPTConfig(dim=...)")),
    )
