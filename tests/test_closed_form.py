"""Closed forms against the simulator over a grid, and the lesson's numbers by hand."""

from __future__ import annotations

from fractions import Fraction

import pytest

from stagewise.errors import ConfigError
from stagewise.schedules import build
from stagewise.sim import Costs, simulate
from stagewise.sim.closed_form import bubble, bubble_fraction, peak_activations


def test_lesson_numbers() -> None:
    # p=4, m=8: (p-1)/m = 3/8 of ideal compute, (p-1)/(m+p-1) = 3/11 of the step.
    assert bubble_fraction("1f1b", 4, 8) == (Fraction(3, 11), Fraction(3, 8))
    assert bubble_fraction("gpipe", 4, 8) == (Fraction(3, 11), Fraction(3, 8))
    # Interleaving with v=2 halves the ideal-relative figure: 3/16.
    assert bubble_fraction("interleaved-1f1b", 4, 8, 2)[1] == Fraction(3, 16)


def test_peaks_by_hand() -> None:
    assert peak_activations("gpipe", 4, 8) == [8, 8, 8, 8]
    assert peak_activations("1f1b", 4, 8) == [4, 3, 2, 1]
    assert peak_activations("1f1b", 4, 2) == [2, 2, 2, 1]
    # Megatron's interleaved factor on rank 0: p (1 + (p-1)/(p v)) = 4 * (1 + 3/8) = 5.5.
    assert peak_activations("interleaved-1f1b", 4, 8, 2)[0] == pytest.approx(5.5)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved-1f1b"])
@pytest.mark.parametrize("backward", [2.0, 3.0])
def test_closed_forms_match_the_simulator(name: str, backward: float) -> None:
    chunk_values = [1, 2, 3, 4] if name == "interleaved-1f1b" else [1]
    for p in range(1, 7):
        for m in range(1, 14):
            for v in chunk_values:
                schedule = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
                timeline = simulate(schedule, Costs.uniform(schedule, 1.0, backward))
                closed = bubble(name, p, m, v)
                where = f"{name} p={p} m={m} v={v}"
                assert timeline.bubble().of_step == pytest.approx(closed.of_step), where
                assert timeline.bubble().vs_ideal == pytest.approx(closed.vs_ideal), where
                simulated = [timeline.peak_activations(r) for r in range(p)]
                assert simulated == pytest.approx(peak_activations(name, p, m, v)), where


def test_no_closed_form_for_unknown() -> None:
    with pytest.raises(ConfigError, match="use the simulator"):
        bubble("zb-h1", 4, 8)
