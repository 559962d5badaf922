"""Closed forms for the zero-bubble schedules: ZB-H1, ZB-H2, ZB-V (and DualPipeV's memory).

Notation: p ranks, m micro-batches; F, I, W the forward, input-gradient and weight-gradient
times of one micro-batch through one *full rank share* of the model (so B = I + W; a V chunk,
half a rank's share, costs F/2, I/2, W/2). Activation memory is in stage-micro-batch units of a
full rank share (a V chunk's micro-batch is 1/2), freed when the W (or B) ends.

"Bubble" here is idle *time*, makespan - busy, the same on every rank when costs are uniform:
the paper's figures (Qi et al., ICLR 2024, tables 1-2). Every formula was derived for, and is
tested against :func:`stagewise.sim.simulate` under, the conditions its docstring states: the
same F, I, W on every rank, free communication (``Link()``), and the ranges of m and of the
cost ratios given. Outside them the functions raise :class:`ConfigError`; use the simulator.
"""

from __future__ import annotations

from stagewise.errors import ConfigError

__all__ = [
    "dualpipev_peak_activations",
    "zb_h1_bubble",
    "zb_h1_makespan",
    "zb_h1_peak_activations",
    "zb_h2_makespan",
    "zb_h2_peak_activations",
    "zb_h2_rank_bubble",
    "zb_v_bubble",
    "zb_v_makespan",
    "zb_v_peak_activations",
]


def _require(condition: bool, schedule: str, what: str) -> None:
    if not condition:
        raise ConfigError(
            f"no closed form for {schedule} here: it needs {what}; "
            "use stagewise.sim.simulate for these sizes and costs"
        )


def _sizes(schedule: str, num_ranks: int, num_microbatches: int, min_m: int) -> None:
    _require(num_ranks >= 1, schedule, f"p >= 1 (got p={num_ranks})")
    _require(
        num_microbatches >= min_m, schedule, f"m >= {min_m} (got m={num_microbatches})"
    )


def _costs(forward: float, input_grad: float, weight_grad: float) -> None:
    if min(forward, input_grad, weight_grad) < 0:
        raise ConfigError(
            f"costs must be >= 0, got F={forward}, I={input_grad}, W={weight_grad}"
        )


def zb_h1_bubble(num_ranks: int, forward: float, input_grad: float, weight_grad: float) -> float:
    """ZB-H1's idle time per rank, (p - 1)(F + I - W).

    Holds when W <= min(F, I) (a deferred W fits in each gap the drain leaves) and m >= p.

    Raises:
        ConfigError: W > min(F, I).

    Example:
        >>> zb_h1_bubble(4, 1.0, 1.0, 1.0)
        3.0
    """
    _costs(forward, input_grad, weight_grad)
    _require(
        weight_grad <= min(forward, input_grad),
        "zb-h1",
        f"W <= min(F, I) (got F={forward}, I={input_grad}, W={weight_grad})",
    )
    return (num_ranks - 1) * (forward + input_grad - weight_grad)


def zb_h1_makespan(
    num_ranks: int, num_microbatches: int, forward: float, input_grad: float, weight_grad: float
) -> float:
    """ZB-H1's step time, m (F + I + W) + (p - 1)(F + I - W).

    Holds when W <= min(F, I) and m >= p.

    Raises:
        ConfigError: outside those conditions.

    Example:
        >>> zb_h1_makespan(4, 8, 1.0, 1.0, 1.0)
        27.0
    """
    _sizes("zb-h1", num_ranks, num_microbatches, num_ranks)
    bubble = zb_h1_bubble(num_ranks, forward, input_grad, weight_grad)
    return num_microbatches * (forward + input_grad + weight_grad) + bubble


def zb_h1_peak_activations(num_ranks: int, num_microbatches: int) -> float:
    """ZB-H1's peak live activations, min(m, p) on *every* rank (1F1B's rank-0 peak).

    Rank r runs p - 1 - r warm-up forwards and defers r W's, so p micro-batches are alive just
    before its first W. Holds for any m >= 1 and any costs.
    """
    _sizes("zb-h1", num_ranks, num_microbatches, 1)
    return float(min(num_microbatches, num_ranks))


def zb_h2_rank_bubble(
    num_ranks: int, forward: float, input_grad: float, weight_grad: float, rank: int = 0
) -> float:
    """ZB-H2's idle time inside rank r's own span (its first start to its last end).

    (p - 1 - r)(F + I - 2W); rank 0's, (p - 1)(F + I - 2W), is the largest and is the paper's
    figure: with the optimizer step's synchronisation removed (its post-validation), each rank's
    step is its own span. Zero on every rank when F + I = 2W (F = I = W, say). Holds when
    W <= F and 2W <= F + I, with m >= 2p - 1.

    Raises:
        ConfigError: outside those cost conditions, or a rank outside 0..p-1.

    Example:
        >>> zb_h2_rank_bubble(4, 1.0, 1.0, 1.0)
        0.0
        >>> zb_h2_rank_bubble(4, 2.0, 2.0, 1.0, rank=1)
        4.0
    """
    _costs(forward, input_grad, weight_grad)
    _require(0 <= rank < num_ranks, "zb-h2", f"a rank in 0..{num_ranks - 1} (got {rank})")
    _require(
        weight_grad <= forward and 2 * weight_grad <= forward + input_grad,
        "zb-h2",
        f"W <= F and 2W <= F + I (got F={forward}, I={input_grad}, W={weight_grad})",
    )
    return (num_ranks - 1 - rank) * (forward + input_grad - 2 * weight_grad)


def zb_h2_makespan(
    num_ranks: int, num_microbatches: int, forward: float, input_grad: float, weight_grad: float
) -> float:
    """ZB-H2's synchronised step time, m (F + I + W) + (p - 1) max(F, F + I - 2W).

    The step waits for the last rank, which cannot start before (p - 1) F: that is the bubble
    when (p - 1)(F + I - 2W) is smaller. Holds when W <= F and 2W <= F + I, with m >= 2p - 1.

    Raises:
        ConfigError: outside those conditions.

    Example:
        >>> zb_h2_makespan(4, 8, 1.0, 1.0, 1.0)
        27.0
    """
    _sizes("zb-h2", num_ranks, num_microbatches, 2 * num_ranks - 1)
    zb_h2_rank_bubble(num_ranks, forward, input_grad, weight_grad)  # checks the conditions
    fill = max(forward, forward + input_grad - 2 * weight_grad)
    return num_microbatches * (forward + input_grad + weight_grad) + (num_ranks - 1) * fill


def zb_h2_peak_activations(num_ranks: int, num_microbatches: int) -> float:
    """ZB-H2's peak live activations, min(m, 2p - 1) on every rank: about twice ZB-H1's.

    Holds for any m >= 1 and any costs.
    """
    _sizes("zb-h2", num_ranks, num_microbatches, 1)
    return float(min(num_microbatches, 2 * num_ranks - 1))


def zb_v_bubble(num_ranks: int, forward: float, input_grad: float, weight_grad: float) -> float:
    """ZB-V's idle time per rank, (p - 1) F / 2: only the fill of the first chunk's forwards.

    Holds when F = I and F/2 <= W <= F (per rank share; the same ratios per chunk), with
    m >= 2p - 1: then the W's exactly fill the V's turns.

    Raises:
        ConfigError: outside those cost conditions.

    Example:
        >>> zb_v_bubble(4, 1.0, 1.0, 1.0)
        1.5
    """
    _costs(forward, input_grad, weight_grad)
    _require(
        forward == input_grad and forward / 2 <= weight_grad <= forward,
        "zb-v",
        f"F = I and F/2 <= W <= F (got F={forward}, I={input_grad}, W={weight_grad})",
    )
    return (num_ranks - 1) * forward / 2


def zb_v_makespan(
    num_ranks: int, num_microbatches: int, forward: float, input_grad: float, weight_grad: float
) -> float:
    """ZB-V's step time, m (F + I + W) + (p - 1) F / 2.

    Holds when F = I, F/2 <= W <= F and m >= 2p - 1.

    Raises:
        ConfigError: outside those conditions.

    Example:
        >>> zb_v_makespan(4, 8, 1.0, 1.0, 1.0)
        25.5
    """
    _sizes("zb-v", num_ranks, num_microbatches, 2 * num_ranks - 1)
    bubble = zb_v_bubble(num_ranks, forward, input_grad, weight_grad)
    return num_microbatches * (forward + input_grad + weight_grad) + bubble


def zb_v_peak_activations(num_ranks: int, num_microbatches: int) -> float:
    """ZB-V's peak live activations, p units (2p chunks of 1/2) on *every* rank.

    Holds for m >= 2p - 1 and any costs (the order fixes the memory, not the timing).

    Raises:
        ConfigError: m < 2p - 1.
    """
    _sizes("zb-v", num_ranks, num_microbatches, 2 * num_ranks - 1)
    return float(num_ranks)


def dualpipev_peak_activations(num_ranks: int, num_microbatches: int) -> float:
    """DualPipeV's peak live activations, p + 1/2 units (2p + 1 chunks) on every rank.

    Holds for every m it runs (m >= 2p) and any costs.

    Raises:
        ConfigError: m < 2p.
    """
    _sizes("dualpipev", num_ranks, num_microbatches, 2 * num_ranks)
    return num_ranks + 0.5
