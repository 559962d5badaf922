"""Collective and point-to-point times on a ring of GPUs (NCCL's large-message behaviour).

A ring collective over n GPUs moves, per GPU, (n-1)/n of the buffer for all-gather and
reduce-scatter and 2(n-1)/n for all-reduce, at the group's bus bandwidth times the link
efficiency, plus one latency per ring step. A group that spans nodes runs over the NICs: with k
of its GPUs in each node, NCCL drives k NICs in parallel (one ring per rail), so its bus
bandwidth is k x the per-GPU network bandwidth, capped by NVLink.
"""

from __future__ import annotations

from stagewise.plan.constants import Constants
from stagewise.plan.hardware import Cluster

__all__ = ["all_gather_time", "all_reduce_time", "group_bandwidth", "p2p_time"]


def group_bandwidth(cluster: Cluster, size: int, stride: int) -> float:
    """Bus bandwidth (bytes/s each way) of a group of ``size`` GPUs ``stride`` apart.

    GPUs are numbered node by node; the group holds GPUs g, g + stride, ..., so it stays in
    one node when ``size * stride <= gpus_per_node``.
    """
    gpu = cluster.gpu
    per_node = cluster.gpus_per_node
    if size * stride <= per_node:
        return gpu.nvlink_bandwidth
    in_node = max(1, per_node // stride)
    return min(gpu.nvlink_bandwidth, in_node * gpu.network_bandwidth)


def all_reduce_time(num_bytes: float, size: int, bandwidth: float, c: Constants) -> float:
    """Ring all-reduce of ``num_bytes`` over ``size`` GPUs."""
    if size <= 1 or num_bytes <= 0:
        return 0.0
    steps = 2 * (size - 1)
    rate = bandwidth * c.link_efficiency
    return steps / size * num_bytes / rate + steps * c.collective_latency_s


def all_gather_time(num_bytes: float, size: int, bandwidth: float, c: Constants) -> float:
    """Ring all-gather (or reduce-scatter) whose full, gathered buffer is ``num_bytes``."""
    if size <= 1 or num_bytes <= 0:
        return 0.0
    steps = size - 1
    rate = bandwidth * c.link_efficiency
    return steps / size * num_bytes / rate + steps * c.collective_latency_s


def p2p_time(num_bytes: float, bandwidth: float, c: Constants) -> float:
    """One send/receive of ``num_bytes`` over a link of ``bandwidth``."""
    return c.p2p_latency_s + num_bytes / (bandwidth * c.link_efficiency)
