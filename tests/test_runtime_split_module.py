"""A user's nn.Module cut by submodule names: the same outputs and gradients as the module,
shared weights as ties (also pipelined on 2 ranks), and clear errors for bad cuts."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import pytest

from stagewise.errors import ConfigError

if TYPE_CHECKING:  # mypy reads torch's types; at run time, skip without torch
    import torch
else:
    torch = pytest.importorskip("torch")

from torch import nn

from stagewise.runtime import launch
from stagewise.runtime.models.model_parts import ModelParts, stage_ties
from stagewise.runtime.models.split_module import expand_names, split_by_names
from stagewise.runtime.models.tiny_gpt import GPTConfig, lm_loss, make_batch
from workers.models import ModelCase, check_model_rank

DATA = GPTConfig(vocab=16, seq_len=6)


class Mix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + torch.tanh(self.linear(x))
        return out


class Toy(nn.Module):
    """Embedding, two blocks in a ModuleList, head; optionally the head tied to the embedding."""

    def __init__(self, tied: bool = False, residual: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList([Mix(), Mix()])
        self.head = nn.Linear(8, 16, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.residual = residual

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = y = self.embed(ids)
        for block in self.blocks:
            y = block(y)
        out: torch.Tensor = self.head(x + y if self.residual else y)
        return out


def _batch(rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return make_batch(DATA, rows, generator)


def _split(model: nn.Module, names: list[str], sample: torch.Tensor | None = None) -> ModelParts:
    return split_by_names(
        model, names, loss_fn=lm_loss, make_batch=_batch, seq_len=DATA.seq_len, sample=sample
    )


def _sample() -> tuple[torch.Tensor, torch.Tensor]:
    return _batch(4, torch.Generator().manual_seed(0))


def test_module_list_name_means_its_children() -> None:
    assert expand_names(Toy(), ["embed", "blocks", "head"]) == [
        "embed", "blocks.0", "blocks.1", "head"
    ]


@pytest.mark.parametrize("tied", [False, True])
def test_layers_in_order_equal_the_module_output_and_gradients(tied: bool) -> None:
    torch.manual_seed(0)
    model = Toy(tied=tied)
    reference = copy.deepcopy(model)
    inputs, targets = _sample()
    parts = _split(model, ["embed", "blocks", "head"], sample=inputs)
    assert len(parts.layers) == 4
    assert parts.layers[1] is model.blocks[0]
    x = inputs
    for layer in parts.layers:
        x = layer(x)
    expected = reference(inputs)
    torch.testing.assert_close(x, expected)
    parts.loss_fn(x, targets).backward()
    lm_loss(expected, targets).backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name)


def test_shared_weight_becomes_a_tie_between_layers() -> None:
    inputs, _ = _sample()
    parts = _split(Toy(tied=True), ["embed", "blocks", "head"], sample=inputs)
    assert parts.ties == ({0: "weight", 3: "weight"},)
    assert stage_ties(parts.ties, [2, 2]) == [{0: "0.weight", 1: "1.weight"}]
    assert _split(Toy(), ["embed", "blocks", "head"]).ties == ()


def test_missing_parameters_are_listed() -> None:
    with pytest.raises(ConfigError, match=r"not in any named submodule: blocks\.1\.linear\.weight"
                       r", blocks\.1\.linear\.bias"):
        _split(Toy(), ["embed", "blocks.0", "head"])


def test_parameters_named_twice_are_listed() -> None:
    with pytest.raises(ConfigError, match=r"in more than one: blocks\.0\.linear\.weight "
                       r"\(2 times\)"):
        _split(Toy(), ["embed", "blocks", "blocks.0", "head"])


def test_forward_that_is_not_the_chain_is_refused() -> None:
    inputs, _ = _sample()
    model = Toy(residual=True)
    with pytest.raises(ConfigError, match="forward is not the chain"):
        _split(model, ["embed", "blocks", "head"], sample=inputs)
    # Without a sample the chain is not checked (coverage is).
    assert len(_split(model, ["embed", "blocks", "head"]).layers) == 4


def test_submodules_in_the_wrong_order_fail_the_chain_check() -> None:
    inputs, _ = _sample()
    with pytest.raises(ConfigError, match=r"submodule 'blocks\.0' on the previous output"):
        _split(Toy(), ["blocks", "embed", "head"], sample=inputs)


def test_dropout_in_training_mode_still_passes_the_chain_check() -> None:
    # Module and chain run from the same random state, so dropout draws the same masks.
    model = nn.Sequential(nn.Embedding(16, 8), nn.Dropout(0.5), nn.Linear(8, 16)).train()
    inputs, _ = _sample()
    assert len(_split(model, ["0", "1", "2"], sample=inputs).layers) == 3


def test_unknown_name_lists_the_children() -> None:
    with pytest.raises(ConfigError, match=r"no submodule 'body'.*embed, blocks, head"):
        _split(Toy(), ["embed", "body", "head"])
    with pytest.raises(ConfigError, match="give the names"):
        _split(Toy(), [])


@pytest.mark.multiproc
def test_pipelined_split_module_with_a_tie_across_ranks_equals_one_process() -> None:
    # TiedToyLM's head projection is its embedding: under 1F1B on 2 ranks the two copies live
    # on different ranks, under ZB-V both on rank 0 (stages 0 and 3).
    cases = [ModelCase("toy", "1f1b"), ModelCase("toy", "zb-v")]
    results = launch(check_model_rank, 2, (cases, 60.0), timeout=120)
    assert len(results) == 2
    for rank, result in enumerate(results):
        assert set(result) == {case.label for case in cases}
        for label, problems in result.items():
            assert problems == [], f"rank {rank} {label}: {problems[:3]}"
