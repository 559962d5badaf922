"""Lower bounds on a pipeline step, for judging a searched schedule.

Notation: p ranks, m micro-batches. :func:`lower_bound` is the largest per-rank busy time;
:func:`fill_bound` adds each rank's unavoidable wait for the first forward.
"""

from __future__ import annotations

from stagewise.sim.costs import Costs, Link

__all__ = ["fill_bound", "lower_bound"]


def lower_bound(placement: tuple[int, ...], num_microbatches: int, costs: Costs) -> float:
    """The largest per-rank busy time: m x sum of F + B over the rank's stages."""
    busy = [0.0] * (max(placement) + 1)
    for stage, rank in enumerate(placement):
        busy[rank] += num_microbatches * (costs.forward[stage] + costs.backward[stage])
    return max(busy)


def fill_bound(placement: tuple[int, ...], num_microbatches: int, costs: Costs,
               link: Link | None = None) -> float:
    """A tighter bound than :func:`lower_bound`: each rank's busy time plus its fill.

    Rank r cannot start before micro-batch 0's forward reaches its first stage (the forwards of
    the earlier stages and the hops between ranks), so no step is shorter than the largest
    (that fill + rank r's busy time). For uniform costs on one chunk per rank this is
    m (F + B) + (p - 1) F, which ZB-H1 reaches when F = I = W.
    """
    link = link or Link()
    num_ranks = max(placement) + 1
    arrival = [0.0] * len(placement)
    for stage in range(1, len(placement)):
        hop = 0.0
        if placement[stage] != placement[stage - 1]:
            hop = link.transfer_time(costs.send_bytes[stage - 1] if costs.send_bytes else 0.0)
        arrival[stage] = arrival[stage - 1] + costs.forward[stage - 1] + hop
    busy = [0.0] * num_ranks
    head = [float("inf")] * num_ranks
    for stage, rank in enumerate(placement):
        busy[rank] += num_microbatches * (costs.forward[stage] + costs.backward[stage])
        head[rank] = min(head[rank], arrival[stage])
    return max(h + b for h, b in zip(head, busy, strict=True))
