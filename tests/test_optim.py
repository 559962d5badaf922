"""The optimizer: weight-decay groups, the learning-rate schedule against hand-computed tables,
the settings' checks, gradient accumulation, and the global gradient norm.

The global norm's multi-process tests compare, on every rank, the norm and every clipped
gradient with ``torch.nn.utils.clip_grad_norm_`` on one process holding the whole model and the
whole global batch (float32, relative tolerance 1e-5; measured differences are about 5e-8):
pp=2 (tiny GPT; GPT-2 with its embedding tied to its head across ranks, also interleaved and
with accumulation), and pp=2 x tp=2, pp=2 x dp=2, pp=2 x fsdp=2 (FSDP2, also with
accumulation).
"""

from __future__ import annotations

import copy
import math

import pytest

from stagewise.errors import ConfigError

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from stagewise.mesh import Mesh  # noqa: E402
from stagewise.runtime import launch  # noqa: E402
from stagewise.runtime.models.tiny_gpt import GPTConfig, gpt_layers, lm_loss, make_batch  # noqa: E402
from stagewise.train.grad_norm import (  # noqa: E402
    clip_grad_norm,
    counted_parameters,
    global_grad_norm,
)
from stagewise.train.optim import (  # noqa: E402
    GradAccumulation,
    apply_lr,
    check_optim_args,
    lr_at,
    param_groups,
)
from workers.optim import NormCase, check_norm_rank  # noqa: E402

CONFIG = GPTConfig(vocab=16, seq_len=8, dim=16, heads=2, layers=2)


def _model() -> nn.Sequential:
    return nn.Sequential(*gpt_layers(CONFIG, seed=3))


def _backward(model: nn.Module, rows: slice = slice(None)) -> None:
    inputs, targets = make_batch(CONFIG, 8, torch.Generator().manual_seed(5))
    lm_loss(model(inputs[rows]), targets[rows]).backward()


def test_param_groups_decay_matrices_not_norms_or_biases() -> None:
    model = _model()
    model.get_parameter("1.norm1.weight").requires_grad_(False)  # frozen: in no group
    groups = param_groups({0: model[:2], 1: model[2:]}, 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}  # type: ignore[attr-defined]
    kept = {names[id(p)] for p in no_decay["params"]}  # type: ignore[attr-defined]
    assert "0.tokens.weight" in decayed
    assert "1.q.weight" in decayed
    assert "3.out.weight" in decayed
    assert {"1.q.bias", "1.norm2.weight", "1.norm2.bias", "3.norm.weight"} <= kept
    assert "1.norm1.weight" not in decayed | kept
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | kept == trainable
    assert all(names[id(p)].endswith(("bias", "weight")) for p in no_decay["params"])  # type: ignore[attr-defined]


def test_param_groups_list_a_shared_parameter_once() -> None:
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    second.weight = first.weight
    groups = param_groups({0: first, 1: second}, 0.01)
    assert [len(g["params"]) for g in groups] == [1, 2]  # type: ignore[arg-type]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    apply_lr(optimizer, 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.5]


# lr=1, warm-up 3 steps, 8 steps, floor 0.1: warm-up (s+1)/4; decay from step 3 (peak) to 7.
WARMUP = [0.25, 0.5, 0.75]
TABLES = {
    "constant": [*WARMUP, 1.0, 1.0, 1.0, 1.0, 1.0],
    "linear": [*WARMUP, 1.0, 0.775, 0.55, 0.325, 0.1],
    "cosine": [*WARMUP, 1.0, 0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2, 0.55,
               0.1 + 0.9 * (1 - math.sqrt(0.5)) / 2, 0.1],
}


@pytest.mark.parametrize("schedule", sorted(TABLES))
def test_lr_at_matches_hand_computed_table(schedule: str) -> None:
    values = [lr_at(s, lr=1.0, schedule=schedule, warmup_steps=3, total_steps=8)
              for s in range(8)]
    assert values == pytest.approx(TABLES[schedule], abs=1e-12)
    assert lr_at(20, lr=1.0, schedule=schedule, warmup_steps=3, total_steps=8) == \
        pytest.approx(TABLES[schedule][-1])


def test_lr_at_without_warmup_starts_at_peak_and_decays_to_zero() -> None:
    values = [lr_at(s, lr=2.0, schedule="cosine", warmup_steps=0, total_steps=3,
                    min_lr_ratio=0.0) for s in range(3)]
    assert values == pytest.approx([2.0, 1.0, 0.0], abs=1e-12)
    assert lr_at(0, lr=2.0, schedule="linear", warmup_steps=0, total_steps=1) == 2.0


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"clip_grad": 0.0}, "--clip-grad 0.0"),
        ({"clip_grad": -1.0}, "must be a positive number"),
        ({"warmup_steps": 10, "total_steps": 10}, "use at most 9 warm-up steps"),
        ({"warmup_steps": 50, "total_steps": 10}, "not shorter than the run's 10 steps"),
        ({"schedule": "exponential"}, "choose one of constant, cosine, linear"),
        ({"warmup_steps": -1}, "--warmup-steps -1"),
        ({"lr": 0.0}, "--lr 0.0"),
        ({"min_lr_ratio": 1.5}, "[0, 1]"),
        ({"weight_decay": -0.1}, "weight decay -0.1"),
        ({"accumulation_steps": 0}, "whole number >= 1"),
    ],
)
def test_bad_optimizer_settings_name_the_fix(kwargs: dict[str, float], words: str) -> None:
    settings: dict[str, float | str] = {"lr": 1e-3, "total_steps": 10, **kwargs}
    with pytest.raises(ConfigError) as info:
        check_optim_args(**settings)  # type: ignore[arg-type]
    assert words in str(info.value)


def test_good_optimizer_settings_pass() -> None:
    check_optim_args(lr=3e-4, schedule="cosine", warmup_steps=9, total_steps=10,
                     clip_grad=1.0, weight_decay=0.1, accumulation_steps=4)
    with pytest.raises(ConfigError, match="not a schedule"):
        lr_at(0, lr=1.0, schedule="step", warmup_steps=0, total_steps=2)


def test_clip_in_one_process_equals_torch() -> None:
    model, reference = _model(), _model()
    _backward(model)
    _backward(reference)
    norm = clip_grad_norm({0: model[:2], 1: model[2:]}, 0.1)
    expected = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1))
    assert norm == pytest.approx(expected, rel=1e-6)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    assert global_grad_norm({0: model}) == pytest.approx(0.1, rel=1e-5)
    with pytest.raises(ConfigError, match="must be positive"):
        clip_grad_norm({0: model}, 0.0)


def test_a_tied_copy_counts_once() -> None:
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    for layer in (first, second):
        layer.weight.grad = torch.ones(3, 3)  # both copies hold the summed gradient
        layer.bias.grad = torch.zeros(3)
    ties = [{0: "weight", 1: "weight"}]
    assert counted_parameters({0: first, 1: second}, ties) == [first.weight, first.bias,
                                                               second.bias]
    assert global_grad_norm({0: first, 1: second}, ties=ties) == pytest.approx(3.0)
    assert global_grad_norm({1: second}, ties=ties) == 0.0  # the lowest stage's rank counts
    clip_grad_norm({0: first, 1: second}, 1.5, ties=ties)
    assert torch.equal(first.weight.grad, second.weight.grad)
    with pytest.raises(ConfigError, match="no parameter 'w'"):
        counted_parameters({0: first}, [{0: "w", 1: "weight"}])


def test_accumulating_two_half_batches_gives_the_whole_batch_mean() -> None:
    model = _model()
    reference = copy.deepcopy(model)
    accumulation = GradAccumulation({0: model}, 2)
    for rows in (slice(0, 4), slice(4, 8)):
        accumulation.before_step()
        _backward(model, rows)
    accumulation.finish()
    _backward(reference)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(ConfigError, match="whole number"):
        GradAccumulation({0: model}, 0)


def _check(results: list[dict[str, dict[str, object]]]) -> None:
    for per_rank in results:
        for label, outcome in per_rank.items():
            assert not outcome["problems"], f"{label}: {outcome['problems']}"
    norms = {label: o["norm"] for per_rank in results for label, o in per_rank.items()}
    assert norms, "no case ran"


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_global_norm_over_pp_and_ties_equals_one_process() -> None:
    cases = [NormCase(Mesh(pp=2)), NormCase(Mesh(pp=2), "gpt2", "interleaved-1f1b"),
             NormCase(Mesh(pp=2), "gpt2", accumulate=True)]
    _check(launch(check_norm_rank, 2, (cases,), timeout=150, threads=1))


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_global_norm_over_tp_dp_and_fsdp_equals_one_process() -> None:
    cases = [NormCase(Mesh(pp=2, tp=2)), NormCase(Mesh(pp=2, dp=2)),
             NormCase(Mesh(pp=2, dp=2, dp_shard=True)),
             NormCase(Mesh(pp=2, dp=2, dp_shard=True), accumulate=True),
             NormCase(Mesh(pp=2, dp=2), "gpt2", accumulate=True)]
    _check(launch(check_norm_rank, 4, (cases,), timeout=270, threads=1))
