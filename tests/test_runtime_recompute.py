"""Full activation recomputation: same gradients as one process, far fewer saved bytes."""

from __future__ import annotations

import pytest

from stagewise.runtime import launch
from stagewise.schedules import build
from workers.pipeline import Case, case_label, check_rank

torch = pytest.importorskip("torch")

from stagewise.runtime.engine.recompute import recomputed  # noqa: E402
from stagewise.runtime.engine.saved import SavedBytes  # noqa: E402
from stagewise.runtime.models.tiny_gpt import GPTConfig, gpt_layers  # noqa: E402

SCHEDULES = (("1f1b", 1), ("zb-h1", 1), ("interleaved-1f1b", 2), ("zb-v", 2))


def test_recomputed_stage_saves_only_layer_inputs() -> None:
    config = GPTConfig(seq_len=16, dim=32, heads=2, layers=3)
    stage = torch.nn.Sequential(*gpt_layers(config)[1:4])
    x = torch.randn(4, 16, 32, requires_grad=True)
    with SavedBytes(stage.parameters()) as plain:
        expected = stage(x)
    with SavedBytes(stage.parameters()) as recomputing:
        actual = recomputed(stage)(x)
    torch.testing.assert_close(actual, expected)
    # One float32 input per block is kept, nothing else.
    assert recomputing.nbytes == 3 * x.numel() * 4
    assert plain.nbytes > 5 * recomputing.nbytes
    # Parameter names are unchanged (ties and checkpoints name parameters).
    assert [n for n, _ in recomputed(stage).named_parameters()] == [
        n for n, _ in stage.named_parameters()
    ]


@pytest.mark.multiproc
def test_recomputed_pipeline_equals_one_process() -> None:
    cases = [
        Case(build(name, num_ranks=2, num_microbatches=4, num_chunks=v), batch_size=8,
             seq_lens=(8, 6), recompute=True)
        for name, v in SCHEDULES
    ]
    results = launch(check_rank, 2, (cases,), timeout=180)
    for case in cases:
        label = case_label(case)
        problems = [p for rank_result in results for p in rank_result[label]]
        assert not problems, "\n".join(problems[:5])
