"""GPUs and clusters: the catalog of accelerators and the nodes x GPUs-per-node a plan runs on.

Bandwidths are per GPU and per direction, in bytes per second once loaded: ``nvlink`` inside a
node, ``network`` (InfiniBand or RoCE) between nodes. Peaks are dense (no sparsity) BF16 tensor
core figures from the vendors' datasheets, cited in ``source``. Beside each peak, the achievable
dense GEMM rate (``gemm_flops``, ``fp8_gemm_flops``): the best large-GEMM throughput measured
with cuBLAS through ``torch.matmul`` (``gemm_source``), what the kernel model scales
(``kernels.gemm_time``); a GPU with no published measurement gets ``UNMEASURED_GEMM_SHARE`` of
its peak, said so in its ``gemm_source``. :func:`get_gpu` also knows the
devices of ``data/toy_devices.json`` (``cpu``: a rough stand-in for one CPU process, so the
planner can lay out toy runs on one machine); :func:`catalog_gpus` lists only real GPUs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from stagewise.errors import PlanError

__all__ = ["UNMEASURED_GEMM_SHARE", "Cluster", "GpuSpec", "catalog_gpus", "get_gpu"]

UNMEASURED_GEMM_SHARE = 0.80
"""Achievable share of the dense peak for a GPU without a published GEMM measurement: H100
SXM's measured share (794.5 of 989 TFLOP/s, stas00/ml-engineering's MAMF table), about the
median of the NVIDIA GPUs there (A100 86.9 %, H100 80.3 %, B200 77.6 %)."""


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator.

    Attributes:
        name: catalog name (``"H100-SXM5-80GB"``).
        peak_flops: dense BF16 peak, FLOP/s.
        memory_gib: device memory, GiB.
        hbm_bandwidth: memory bandwidth, bytes/s.
        nvlink_bandwidth: intra-node bandwidth per GPU each way, bytes/s.
        network_bandwidth: inter-node bandwidth per GPU each way, bytes/s.
        gpus_per_node: GPUs in the vendor's reference node.
        source: where the figures come from.
        sms: streaming multiprocessors: a GEMM's output tiles run on them in waves.
        fp8_peak_flops: dense FP8 peak, FLOP/s; 0 when the GPU has no FP8 tensor cores.
        gemm_flops: achievable dense BF16 rate of a large GEMM, FLOP/s (0: the peak x
            ``UNMEASURED_GEMM_SHARE``).
        fp8_gemm_flops: achievable dense FP8 rate of a large GEMM, FLOP/s (0: the FP8 peak x
            ``UNMEASURED_GEMM_SHARE``).
        gemm_source: where the achievable rates come from.
        sustained_share: the share of the measured (burst) GEMM rate a GPU keeps when it is
            saturated at its power limit for a whole training step: the sustained rate over the
            burst rate (stas00/ml-engineering's MSMF over MAMF); 1.0 where the datasheet peak is
            defined at the GPU's top clock (no burst headroom to lose) or nothing is measured.
        sustained_source: where ``sustained_share`` comes from.
    """

    name: str
    peak_flops: float
    memory_gib: float
    hbm_bandwidth: float
    nvlink_bandwidth: float
    network_bandwidth: float
    gpus_per_node: int = 8
    source: str = ""
    sms: int = 1
    fp8_peak_flops: float = 0.0
    gemm_flops: float = 0.0
    fp8_gemm_flops: float = 0.0
    gemm_source: str = ""
    sustained_share: float = 1.0
    sustained_source: str = ""

    @property
    def has_fp8(self) -> bool:
        """Whether the GPU has FP8 tensor cores."""
        return self.fp8_peak_flops > 0

    def achievable_gemm_flops(self, fp8: bool = False) -> float:
        """The large-GEMM rate (BF16 or FP8) sustained at the power limit, FLOP/s: the measured
        burst rate (``gemm_flops``) x ``sustained_share`` (the power-limited clock applies to
        both data types)."""
        peak, measured = (
            (self.fp8_peak_flops, self.fp8_gemm_flops) if fp8
            else (self.peak_flops, self.gemm_flops)
        )
        burst = measured if measured > 0 else peak * UNMEASURED_GEMM_SHARE
        return burst * self.sustained_share

    def __post_init__(self) -> None:
        for label in ("peak_flops", "memory_gib", "hbm_bandwidth", "nvlink_bandwidth",
                      "network_bandwidth"):
            if getattr(self, label) <= 0:
                raise PlanError(f"gpu {self.name}: {label} must be > 0, got {getattr(self, label)}")
        if not 0 < self.sustained_share <= 1:
            raise PlanError(
                f"gpu {self.name}: sustained_share must be in (0, 1], got {self.sustained_share}"
            )


@dataclass(frozen=True)
class Cluster:
    """``nodes`` machines of ``gpus_per_node`` identical GPUs."""

    gpu: GpuSpec
    nodes: int
    gpus_per_node: int

    def __post_init__(self) -> None:
        for label in ("nodes", "gpus_per_node"):
            value = getattr(self, label)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"cluster: {label} must be a positive integer, got {value!r}")

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def node_network_gbps(self) -> float:
        """Inter-node bandwidth of one node, Gbit/s each way (its GPUs' NICs together)."""
        return self.gpu.network_bandwidth * self.gpus_per_node * 8 / 1e9

    def with_node_network(self, gbps: float) -> Cluster:
        """This cluster with ``gbps`` Gbit/s of inter-node bandwidth per node each way (the sum
        over its NICs, e.g. 400 for 4 x 100 Gb/s), shared evenly by its GPUs: for clusters
        whose network is not the GPU's reference node's (``data/gpus.json``: DGX/HGX nodes
        with one 200 or 400 Gb/s NIC per GPU).

        Raises:
            PlanError: a bandwidth that is not a positive number.
        """
        if isinstance(gbps, bool) or not isinstance(gbps, int | float) or not 0 < gbps < math.inf:
            raise PlanError(
                f"node network bandwidth must be > 0 Gbit/s, got {gbps!r}: give the sum of a "
                "node's NICs, e.g. 400 for 4 x 100 Gb/s"
            )
        per_gpu = gbps * 1e9 / 8 / self.gpus_per_node
        return Cluster(replace(self.gpu, network_bandwidth=per_gpu), self.nodes,
                       self.gpus_per_node)

    @classmethod
    def of_gpus(cls, gpu: GpuSpec, num_gpus: int, gpus_per_node: int | None = None) -> Cluster:
        """A cluster of ``num_gpus`` GPUs in nodes of ``gpus_per_node`` (default the GPU's)."""
        per_node = gpus_per_node or gpu.gpus_per_node
        if num_gpus <= per_node:
            return cls(gpu, 1, num_gpus)
        if num_gpus % per_node:
            raise PlanError(
                f"--gpus {num_gpus} is not a multiple of {per_node} GPUs per node: give "
                f"--nodes and --gpus-per-node instead"
            )
        return cls(gpu, num_gpus // per_node, per_node)


def _catalog(name: str = "gpus") -> dict[str, dict[str, Any]]:
    text = resources.files("stagewise.plan").joinpath(f"data/{name}.json").read_text()
    data: dict[str, dict[str, Any]] = json.loads(text)
    data.pop("_comment", None)
    return data


def catalog_gpus() -> list[str]:
    """Names of the GPUs in the catalog."""
    return sorted(_catalog())


def get_gpu(name: str) -> GpuSpec:
    """The catalog GPU ``name`` or one of its aliases (case-insensitive).

    Raises:
        PlanError: unknown name; the message lists the catalog.

    Example:
        >>> get_gpu("h100").memory_gib
        79.6
    """
    key = name.lower()
    for full, entry in {**_catalog(), **_catalog("toy_devices")}.items():
        if key == full.lower() or key in entry.get("aliases", []):
            return GpuSpec(
                name=full,
                peak_flops=entry["peak_tflops"] * 1e12,
                memory_gib=entry["memory_gib"],
                hbm_bandwidth=entry["hbm_tb_s"] * 1e12,
                nvlink_bandwidth=entry["nvlink_gb_s"] * 1e9,
                network_bandwidth=entry["network_gb_s"] * 1e9,
                gpus_per_node=entry.get("gpus_per_node", 8),
                source=entry.get("source", ""),
                sms=entry.get("sms", 1),
                fp8_peak_flops=entry.get("fp8_peak_tflops", 0.0) * 1e12,
                gemm_flops=entry.get("gemm_tflops", 0.0) * 1e12,
                fp8_gemm_flops=entry.get("fp8_gemm_tflops", 0.0) * 1e12,
                gemm_source=entry.get("gemm_source", "not measured: "
                                      f"{UNMEASURED_GEMM_SHARE:g} x the dense peak"),
                sustained_share=entry.get("sustained_share", 1.0),
                sustained_source=entry.get("sustained_source", "no burst-to-sustained loss "
                                           "measured: 1.0"),
            )
    raise PlanError(
        f"unknown GPU {name!r}: choose one of {', '.join(catalog_gpus())} (or "
        f"{', '.join(sorted(_catalog('toy_devices')))} for toy runs on this machine)"
    )
