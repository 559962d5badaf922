"""Training metrics: JSON lines and TensorBoard event files read back, MFU from the planner's
FLOP count, GPU peaks by CUDA's device names, peak memory, and the missing-tensorboard error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from stagewise.errors import ConfigError
from stagewise.plan.flops import model_flops_per_token
from stagewise.plan.models import model_from_hf_config
from stagewise.train.metrics import (
    MetricsWriter,
    flops_per_token,
    gpu_peak_flops,
    mfu,
    peak_memory_bytes,
    require_tensorboard,
    tiny_gpt_spec,
)

GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 100,
        "n_positions": 128}


def test_writer_writes_json_lines_and_event_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines, board = tmp_path / "out" / "metrics.jsonl", tmp_path / "tb"
    with MetricsWriter(str(lines), str(board)) as metrics:
        for step in range(3):
            metrics.write(step, loss=2.0 - step * 0.5, lr=1e-3 * (step + 1), mfu=None,
                          tokens_per_s=1000 + step)
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    assert records[1] == {"step": 1, "loss": 1.5, "lr": 0.002, "tokens_per_s": 1001}
    assert [r["step"] for r in records] == [0, 1, 2]
    events = EventAccumulator(str(board))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "lr", "tokens_per_s"}
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    assert losses == [(0, 2.0), (1, 1.5), (2, 1.0)]


def test_writer_json_only_needs_no_tensorboard(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    metrics = MetricsWriter(str(path), None)
    metrics.write(4, loss=float("nan"), grad_norm=0.5)
    with pytest.raises(ConfigError, match="'loss' = 'high' is not a number"):
        metrics.write(5, loss="high")  # type: ignore[arg-type]
    metrics.close()
    metrics.close()
    assert json.loads(path.read_text()) == {"step": 4, "loss": "nan", "grad_norm": 0.5}


def test_unwritable_metrics_path_names_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write metrics to"):
        MetricsWriter(str(blocker / "m.jsonl"), None)


def test_missing_tensorboard_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        require_tensorboard()
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        MetricsWriter(None, "tb")


def test_flops_per_token_is_the_planners_count() -> None:
    spec = tiny_gpt_spec(layers=1, dim=64, heads=1, vocab=100, seq_len=32)
    eq7 = 72 * 64**2 * (1 + 32 / (6 * 64) + 100 / (12 * 64))  # Korthikanti eq. 7, GPT shapes
    assert flops_per_token(spec, 32) == pytest.approx(eq7)
    assert flops_per_token(GPT2, 16) == model_flops_per_token(model_from_hf_config(GPT2), 16)
    assert flops_per_token(GPT2, 16, lora=True) == pytest.approx(flops_per_token(GPT2, 16) * 2 / 3)
    with pytest.raises(ConfigError, match="no FLOP count for MFU"):
        flops_per_token({"model_type": "bert"}, 16)


def test_mfu_divides_model_flops_by_the_peak() -> None:
    assert mfu(2000.0, 3e9, 1e13) == pytest.approx(0.6)
    assert mfu(2000.0, 3e9, None) is None  # CPU: no peak, no MFU
    with pytest.raises(ConfigError, match="must be positive"):
        mfu(1.0, 1.0, 0.0)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-40GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("Tesla V100-SXM2-32GB", 125.0),
        ("NVIDIA GeForce RTX 4090", None),
        ("cpu", None),
    ],
)
def test_gpu_peak_by_cuda_name(name: str, tflops: float | None) -> None:
    peak = gpu_peak_flops(name)
    assert (None if peak is None else peak / 1e12) == (
        None if tflops is None else pytest.approx(tflops))


def test_peak_memory_on_cpu_is_the_process_rss() -> None:
    assert 10 * 2**20 < peak_memory_bytes("cpu") < 64 * 2**30


@pytest.mark.parametrize(
    ("mesh", "gpus", "torchrun", "counted"),
    [("pp=4", 4, False, 4), ("pp=2,dp=2", 8, False, 4), ("pp=2", 1, False, 1),
     ("pp=4,dp=4", 8, True, 16)],
)
def test_mfu_counts_every_gpu_of_the_run_once(
    monkeypatch: pytest.MonkeyPatch, mesh: str, gpus: int, torchrun: bool, counted: int,
) -> None:
    # The run's tokens/s is measured against every GPU training together: one rank per GPU,
    # local ranks beyond the GPUs share them, torchrun ranks each have one (over nodes).
    torch = pytest.importorskip("torch")
    from stagewise.mesh import Mesh
    from stagewise.runconfig import RunConfig
    from stagewise.train.telemetry import _run_peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    from stagewise.runconfig.sections import BatchConfig

    config = RunConfig(mesh=Mesh.parse(mesh), batch=BatchConfig(global_batch=64))
    peak = _run_peak_flops(config)
    assert peak == pytest.approx(counted * 989.4e12)
