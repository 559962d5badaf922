"""Measured timelines, costs and memory; saved-tensor counting; micro-batch split; p2p headers."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # mypy reads torch's types; at run time, skip without torch
    import torch
else:
    torch = pytest.importorskip("torch")
from torch import nn

from stagewise.errors import ConfigError
from stagewise.runtime.engine.measure import (
    link_latency,
    measured_costs,
    measured_timeline,
    peak_saved_bytes,
)
from stagewise.runtime.engine.microbatch import loss_weights, split_batch
from stagewise.runtime.engine.p2p import decode_header, encode_header
from stagewise.runtime.engine.saved import SavedBytes
from stagewise.schedules import Op, build
from stagewise.sim import Event


def _events() -> list[Event]:
    # gpipe p=2 m=2 by hand, clock starting at 100 s: F 1 s, B 2 s.
    return [
        Event(0, 0, Op.F, 0, 100, 101), Event(0, 0, Op.F, 1, 101, 102),
        Event(1, 1, Op.F, 0, 101, 102), Event(1, 1, Op.F, 1, 102, 103),
        Event(1, 1, Op.B, 0, 103, 105), Event(1, 1, Op.B, 1, 105, 107),
        Event(0, 0, Op.B, 0, 105, 107), Event(0, 0, Op.B, 1, 107, 109),
    ]


def test_measured_timeline_starts_at_zero_and_carries_bytes() -> None:
    schedule = build("gpipe", num_ranks=2, num_microbatches=2)
    saved = {(0, 0): 100, (0, 1): 300, (1, 0): 50, (1, 1): 50}
    timeline = measured_timeline(schedule, _events(), saved)
    assert timeline.source == "measured"
    assert timeline.time_unit == "s"
    assert timeline.start == 0
    assert timeline.makespan == 9
    assert timeline.activation_bytes == (200.0, 50.0)
    # Rank 0 holds both forwards' bytes until its first backward ends.
    assert peak_saved_bytes(timeline, saved, 0) == 400
    assert peak_saved_bytes(timeline, saved, 1) == 100


def test_measured_costs_average_per_stage() -> None:
    schedule = build("gpipe", num_ranks=2, num_microbatches=2)
    costs = measured_costs([measured_timeline(schedule, _events())])
    assert costs.forward == (1.0, 1.0)
    assert costs.backward == (2.0, 2.0)
    assert costs.weight == (1.0, 1.0)


def test_saved_bytes_counts_activations_not_weights() -> None:
    layer = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16, requires_grad=True)
    with SavedBytes(layer.parameters()) as saved:
        layer(x)
    # Saved, float32: x (8x16) by the first Linear, and the ReLU's result (8x32), which ReLU
    # and the second Linear both save but is counted once. Weights are not counted.
    assert saved.nbytes == 4 * (8 * 16 + 8 * 32)
    with SavedBytes(layer.parameters()) as saved, torch.no_grad():
        layer(x)
    assert saved.nbytes == 0


def test_split_batch_and_weights_give_the_whole_batch_mean() -> None:
    batch = torch.arange(7.0)
    parts = split_batch(batch, 3)
    weights = loss_weights(parts)
    mean = sum(w * p.mean() for w, p in zip(weights, parts, strict=True))
    torch.testing.assert_close(mean, batch.mean())
    with pytest.raises(ConfigError, match="2 rows along dimension 0 but the schedule runs 3"):
        split_batch(torch.zeros(2, 5), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_header_round_trip(dtype: torch.dtype) -> None:
    tensor = torch.zeros(3, 1, 7, dtype=dtype)
    assert decode_header(encode_header(tensor)) == (dtype, (3, 1, 7), False)
    assert decode_header(encode_header(tensor, remembered=True))[2] is True
    with pytest.raises(ConfigError, match="at most 8"):
        encode_header(torch.zeros([1] * 9))


@pytest.mark.multiproc
def test_import_stagewise_does_not_import_torch_until_pipeline_is_used() -> None:
    code = (
        "import sys, stagewise; assert 'torch' not in sys.modules; "
        "stagewise.schedules.build('1f1b', num_ranks=2, num_microbatches=2); "
        "assert 'torch' not in sys.modules; stagewise.Pipeline; "
        "assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_link_latency_counts_only_waits_of_idle_ranks() -> None:
    schedule = build("gpipe", num_ranks=2, num_microbatches=2)
    events = _events()
    # Delays after the sender finished, each on an idle receiver: 1F0 starts 0.3 s after 0F0
    # (101), 1F1 0.1 s after 0F1 (102, rank 1 free since 102), 0B0 0.5 s after 1B0 (105).
    # The last stage's backward has no sender, and a receiver still busy would not count.
    events[2] = Event(1, 1, Op.F, 0, 101.3, 102.0)
    events[3] = Event(1, 1, Op.F, 1, 102.1, 103.0)
    events[6] = Event(0, 0, Op.B, 0, 105.5, 107.0)
    timeline = measured_timeline(schedule, events)
    assert link_latency([timeline]) == pytest.approx(0.3)
    assert link_latency([measured_timeline(schedule, _events())]) == 0.0


def test_peak_saved_bytes_frees_at_b_or_w_in_a_mixed_schedule() -> None:
    schedule = build("gpipe", num_ranks=1, num_microbatches=3)
    events = [
        Event(0, 0, Op.F, 0, 0, 1), Event(0, 0, Op.B, 0, 1, 2),  # full backward frees 10
        Event(0, 0, Op.F, 1, 2, 3), Event(0, 0, Op.I, 1, 3, 4),
        Event(0, 0, Op.W, 1, 4, 5),  # split backward: W frees 20
        Event(0, 0, Op.F, 2, 5, 6), Event(0, 0, Op.B, 2, 6, 7),
    ]
    saved = {(0, 0): 10, (0, 1): 20, (0, 2): 30}
    # Freed at B and at W, at most one micro-batch is alive: the peak is the largest, 30.
    assert peak_saved_bytes(measured_timeline(schedule, events), saved, 0) == 30
