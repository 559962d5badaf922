"""bf16 mixed precision: autocast compute, bf16 transfers, fp32 weights; fp32 unchanged."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from stagewise.cli import cli
from stagewise.errors import ConfigError

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

from stagewise.runtime.engine.partition import partition
from stagewise.runtime.engine.precision import autocast_stage, float_loss, torch_dtype
from stagewise.runtime.models.model_parts import tiny_gpt_parts
from stagewise.runtime.models.tiny_gpt import GPTConfig

SIZES = ["--layers", "2", "--dim", "32", "--seq-len", "16", "--global-batch", "8", "-m", "4"]
STEPS = 20
LR = 3e-3


def test_a_bf16_stage_sends_bf16_and_keeps_fp32_weights() -> None:
    stage = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    autocast_stage(stage, torch.bfloat16, "cpu")
    out = stage(torch.ones(3, 4))
    assert out.dtype == torch.bfloat16  # what crosses to the next rank: half the bytes
    assert out.element_size() * 2 == torch.ones(1).element_size()
    assert {p.dtype for p in stage.parameters()} == {torch.float32}
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in stage.parameters())


def test_unsupported_dtypes_are_refused() -> None:
    with pytest.raises(ConfigError, match="--dtype 'fp8' is not supported: choose one of fp32"):
        torch_dtype("fp8")
    assert cli(["train", "--dtype", "fp8", "--no-plots"]) == 2


def _one_process_bf16() -> list[float]:
    """The same run in one process: the same stages (each casting its output to bf16), the
    same micro-batches with their weights, gradients accumulated, AdamW."""
    parts = tiny_gpt_parts(GPTConfig(seq_len=16, dim=32, heads=4, layers=2), seed=0)
    generator = torch.Generator().manual_seed(1)
    sample, _ = parts.make_batch(8, generator)
    stages = partition(list(parts.layers), 2, "params", sample[:2])
    for stage in stages:
        autocast_stage(stage, torch.bfloat16, "cpu")
    model = torch.nn.Sequential(*stages)
    loss_fn = float_loss(parts.loss_fn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        inputs, targets = parts.make_batch(8, torch.Generator().manual_seed(step + 1))
        total = torch.zeros(())
        for x, y in zip(inputs.chunk(4), targets.chunk(4), strict=True):
            loss = loss_fn(model(x), y) * (len(x) / len(inputs))
            loss.backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(total))
    return losses


@pytest.mark.multiproc
@pytest.mark.slow
def test_bf16_pipeline_tracks_bf16_in_one_process_over_20_steps(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli(["train", "-p", "2", "--steps", str(STEPS), "--lr", str(LR), "--dtype", "bf16",
                "--json", "--no-plots", *SIZES]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    losses = report["losses"]
    reference = _one_process_bf16()
    # The same bf16 arithmetic but for the order of a few sums: bf16 keeps 8 bits of
    # mantissa, so a stated 1 % over 20 steps of AdamW.
    assert losses == pytest.approx(reference, rel=1e-2)
    assert losses[-1] < losses[0]  # it trains


@pytest.mark.multiproc
@pytest.mark.slow
def test_bf16_under_fsdp_gathers_bf16_and_tracks_bf16_in_one_process(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # pp=2 x fsdp=2: FSDP2's MixedPrecisionPolicy gathers the fp32 shards as bf16 and
    # reduce-scatters fp32 gradients; the one-process reference casts to bf16 inside autocast
    # instead, and each replica sees half the batch, so the sums differ in order and rounding:
    # a stated 2 % over 20 steps.
    assert cli(["train", "--mesh", "pp=2,fsdp=2", "--steps", str(STEPS), "--lr", str(LR),
                "--dtype", "bf16", "--json", "--no-plots", *SIZES]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert report["losses"] == pytest.approx(_one_process_bf16(), rel=2e-2)


def test_fsdp_policy_casts_parameters_only_in_bf16() -> None:
    from stagewise.runtime.parallel.mesh import fsdp_policy

    assert fsdp_policy(None).param_dtype is None  # fp32: FSDP2's default policy, no cast
    policy = fsdp_policy(torch.bfloat16)
    assert policy.param_dtype == torch.bfloat16
    assert policy.reduce_dtype == torch.float32  # gradients reduced and kept in fp32
