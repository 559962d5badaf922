"""The local launcher and failure handling: every rank stops, the first error is reported.

No test may hang: each has a pytest timeout, the ranks have a pipeline timeout, and the
launcher ends stragglers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent))

from runtime_workers import echo_rank, faulty_rank
from stagewise.errors import RuntimeFailure
from stagewise.runtime import launch


@pytest.mark.multiproc
@pytest.mark.timeout(60)
def test_launch_returns_each_rank_result_in_order() -> None:
    assert launch(echo_rank, 3, (10,), timeout=50) == [(0, 3, 10), (1, 3, 11), (2, 3, 12)]


def _fail(kind: str, timeout: float = 20.0) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(RuntimeFailure) as caught:
        launch(faulty_rank, 3, (kind, 1, timeout), timeout=60, grace=timeout)
    return str(caught.value), time.monotonic() - start


@pytest.mark.multiproc
@pytest.mark.timeout(90)
def test_exception_in_a_layer_stops_every_rank_and_names_rank_and_action() -> None:
    message, elapsed = _fail("raise")
    first = message.split("; then ")[0]
    assert first.startswith("rank 1 failed at 1F")
    assert "micro-batch 1" in first
    assert "injected failure in a layer" in first
    # The others stopped because of it, promptly, not at the 20 s timeout.
    assert "rank 0" in message
    assert "rank 2" in message
    assert elapsed < 15


@pytest.mark.multiproc
@pytest.mark.timeout(90)
def test_nan_loss_with_check_finite_stops_the_run() -> None:
    message, elapsed = _fail("nan")
    first = message.split("; then ")[0]
    assert first.startswith("rank 2 failed at 2F1")
    assert "NonFiniteLoss" in first
    assert elapsed < 15


@pytest.mark.multiproc
@pytest.mark.timeout(90)
def test_killed_rank_is_reported_and_the_others_stop() -> None:
    message, elapsed = _fail("kill")
    first = message.split("; then ")[0]
    assert first.startswith("rank 1 was killed by SIGKILL (last action 1F1)")
    assert elapsed < 15


@pytest.mark.multiproc
@pytest.mark.timeout(90)
def test_a_hung_rank_makes_the_others_time_out() -> None:
    message, elapsed = _fail("hang", timeout=3.0)
    assert "waited past the timeout" in message
    assert elapsed < 20


@pytest.mark.multiproc
@pytest.mark.timeout(90)
def test_rank_errors_carry_the_global_name_given_to_launch() -> None:
    # In a mesh the pipeline's own numbering (rank 1) is ambiguous: replicas repeat it.
    names = ["rank 0 (pp 0, dp 1)", "rank 1 (pp 1, dp 1)", "rank 2 (pp 2, dp 1)"]
    with pytest.raises(RuntimeFailure) as caught:
        launch(faulty_rank, 3, ("raise", 1, 20.0), timeout=60, grace=20, names=names)
    first = str(caught.value).split("; then ")[0]
    assert first.startswith("rank 1 (pp 1, dp 1) failed at 1F")
    assert "injected failure in a layer" in first
