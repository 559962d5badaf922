"""I then W gives exactly the gradients of one full backward, for ordinary modules."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # mypy reads torch's types; at run time, skip without torch
    import torch
else:
    torch = pytest.importorskip("torch")
from torch import nn

from stagewise.runtime.engine.split_backward import backward_input
from stagewise.runtime.models.tiny_gpt import Block, Embedding, GPTConfig, Head

CONFIG = GPTConfig(vocab=11, seq_len=6, dim=8, heads=2, layers=1)


class TwiceUsed(nn.Module):
    """The same Linear at two depths: the weight gets gradient along two paths."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(self.norm(self.linear(x)))
        return out


class IgnoresInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand_as(x) * 2


MODULES = {
    "mlp": lambda: nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)),
    "block": lambda: Block(CONFIG),
    "block+head": lambda: nn.Sequential(Block(CONFIG), Head(CONFIG)),
    "twice-used": TwiceUsed,
    "ignores-input": IgnoresInput,
}


@pytest.mark.parametrize("name", list(MODULES))
def test_input_then_weight_equals_full_backward(name: str) -> None:
    torch.manual_seed(0)
    module = MODULES[name]()
    reference = copy.deepcopy(module)
    x = torch.randn(3, 6, 8)
    leaf = x.clone().requires_grad_()
    out = module(leaf)
    grad_out = torch.randn_like(out)
    grad_in, weight = backward_input(out, grad_out, leaf, list(module.parameters()))
    assert all(p.grad is None for p in module.parameters()), "I must not touch weights"
    weight.run()
    ref_leaf = x.clone().requires_grad_()
    reference(ref_leaf).backward(grad_out)
    assert grad_in is not None
    expected = ref_leaf.grad if ref_leaf.grad is not None else torch.zeros_like(x)
    torch.testing.assert_close(grad_in, expected)
    for p, q in zip(module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_first_stage_without_input_grad_does_everything_in_w() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(Embedding(CONFIG), Block(CONFIG))
    reference = copy.deepcopy(module)
    ids = torch.randint(0, CONFIG.vocab, (2, 5))
    out = module(ids)
    grad_out = torch.randn_like(out)
    grad_in, weight = backward_input(out, grad_out, None, list(module.parameters()))
    assert grad_in is None
    weight.run()
    reference(ids).backward(grad_out)
    for p, q in zip(module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_last_stage_scalar_loss_and_accumulation_over_microbatches() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(Block(CONFIG), Head(CONFIG))
    reference = copy.deepcopy(module)
    targets = torch.randint(0, CONFIG.vocab, (2, 6))
    inputs = [torch.randn(2, 6, 8) for _ in range(2)]
    pending = []
    for x in inputs:  # both I first, then both W: W is deferred past another micro-batch
        leaf = x.clone().requires_grad_()
        loss = nn.functional.cross_entropy(module(leaf).flatten(0, 1), targets.flatten()) / 2
        pending.append(backward_input(loss, None, leaf, list(module.parameters()))[1])
    for weight in pending:
        weight.run()
    for x in inputs:
        loss = nn.functional.cross_entropy(reference(x).flatten(0, 1), targets.flatten()) / 2
        loss.backward()
    for p, q in zip(module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
