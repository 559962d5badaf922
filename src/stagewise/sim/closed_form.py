"""Closed-form bubble and activation figures for GPipe, 1F1B and interleaved 1F1B.

Notation: p pipeline ranks, m micro-batches, v chunks per rank (each chunk one virtual stage),
r a rank.
They hold for uniform costs (every rank does the same work per micro-batch, any forward to
backward ratio) and free communication; the simulator gives the exact figure otherwise.

- GPipe and 1F1B: the step takes (m + p - 1) slots of one forward+backward, of which m are
  work, so the bubble is (p - 1)/m relative to ideal compute and (p - 1)/(m + p - 1) of the step.
- Interleaved 1F1B: each chunk costs 1/v of a slot and the fill/drain still crosses p - 1 ranks
  once, so the bubble is (p - 1)/(v m) relative to ideal compute, (p - 1)/(v m + p - 1) of the
  step (Narayanan et al. 2021). Holds when m is a multiple of p; other m are checked against the
  simulator in the tests and reported there.
- Peak live activations, in stage-micro-batch units (one micro-batch through a full rank share):
  GPipe m on every rank; 1F1B min(p - r, m); interleaved (w_r + 1)/v with
  w_r = (v - 1) g + 2 (p - r - 1) warm-up forwards (g = p when m is a multiple of p), capped at
  m: rank 0 holds p + (p - 1)/v, the (1 + (p - 1)/(p v)) factor over 1F1B that Megatron reports.
"""

from __future__ import annotations

from fractions import Fraction

from stagewise.errors import ConfigError
from stagewise.schedules._checks import require_positive
from stagewise.sim.timeline import Bubble

__all__ = ["SUPPORTED", "bubble", "bubble_fraction", "peak_activations", "step_slots"]

SUPPORTED = ("gpipe", "1f1b", "interleaved-1f1b")


def _chunks(name: str, num_chunks: int) -> int:
    if name not in SUPPORTED:
        raise ConfigError(
            f"no closed form for schedule {name!r}: closed forms exist for "
            f"{', '.join(SUPPORTED)}; use the simulator for the others"
        )
    return num_chunks if name == "interleaved-1f1b" else 1


def bubble_fraction(name: str, num_ranks: int, num_microbatches: int,
                    num_chunks: int = 1) -> tuple[Fraction, Fraction]:
    """Exact (of_step, vs_ideal) bubble fractions as fractions."""
    require_positive(name, num_ranks=num_ranks, num_microbatches=num_microbatches,
                     num_chunks=num_chunks)
    v = _chunks(name, num_chunks)
    p, m = num_ranks, num_microbatches
    slots = step_slots(name, p, m, v)
    return 1 - Fraction(m) / slots, slots / m - 1


def step_slots(name: str, num_ranks: int, num_microbatches: int, num_chunks: int = 1) -> Fraction:
    """Step time in slots of one micro-batch's forward+backward through a full rank share.

    m + (p - 1)/v when m >= p; with fewer micro-batches than ranks, one micro-batch's own trip
    through all p ranks sets the pace and the step takes p + (m - 1)/v.
    """
    v = _chunks(name, num_chunks)
    p, m = num_ranks, num_microbatches
    if m >= p:
        return m + Fraction(p - 1, v)
    return p + Fraction(m - 1, v)


def bubble(name: str, num_ranks: int, num_microbatches: int, num_chunks: int = 1) -> Bubble:
    """The closed-form bubble of ``name`` both ways.

    Example:
        >>> bubble("1f1b", 4, 8)
        Bubble(of_step=0.2727272727272727, vs_ideal=0.375)
    """
    of_step, vs_ideal = bubble_fraction(name, num_ranks, num_microbatches, num_chunks)
    return Bubble(of_step=float(of_step), vs_ideal=float(vs_ideal))


def peak_activations(name: str, num_ranks: int, num_microbatches: int, num_chunks: int = 1,
                     ) -> list[float]:
    """Peak live activations of each rank, in stage-micro-batch units.

    Example:
        >>> peak_activations("1f1b", 4, 8)
        [4.0, 3.0, 2.0, 1.0]
    """
    require_positive(name, num_ranks=num_ranks, num_microbatches=num_microbatches,
                     num_chunks=num_chunks)
    v = _chunks(name, num_chunks)
    p, m = num_ranks, num_microbatches
    if name == "gpipe":
        return [float(m)] * p
    if name == "1f1b":
        return [float(min(p - r, m)) for r in range(p)]
    group = m // max(1, m // p) + (1 if m % max(1, m // p) else 0)
    return [min(m * v, (v - 1) * group + 2 * (p - r - 1) + 1) / v for r in range(p)]
