"""Advice around a search: what would fit when nothing does, and whether a claimed speed can be.

:func:`what_would_fit` tries, in order, more nodes of the same GPU (x2, x4, ... up to x16),
LoRA fine-tuning on the same cluster, and GPUs with more memory on the same number of nodes,
and reports the fastest fitting plan of each. :func:`check_claim` compares a claimed step rate
with the physical lower bound: the step's fewest FLOPs (matmuls, causal attention, no
recomputation) at every GPU's dense peak with nothing else taking time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from stagewise.errors import PlanError
from stagewise.plan.constants import DEFAULT_CONSTANTS, Constants
from stagewise.plan.evaluate import Plan, lower_bound_step_time
from stagewise.plan.hardware import Cluster, catalog_gpus, get_gpu
from stagewise.plan.models import ModelSpec
from stagewise.plan.search import search
from stagewise.plan.spec import TrainingSpec

__all__ = ["Claim", "Suggestion", "check_claim", "what_would_fit"]


@dataclass(frozen=True)
class Suggestion:
    """A change that makes the run fit, with the fastest plan it allows."""

    change: str
    plan: Plan


@dataclass(frozen=True)
class Claim:
    """A claimed step rate against the physics."""

    steps_per_s: float
    claimed_step_s: float
    lower_bound_s: float
    predicted_step_s: float | None

    @property
    def possible(self) -> bool:
        return self.claimed_step_s >= self.lower_bound_s

    def describe(self, cluster: Cluster) -> str:
        gpu = cluster.gpu
        verdict = (
            f"impossible: {self.lower_bound_s / self.claimed_step_s:.1f}x faster than the "
            "hardware can compute the step at all"
            if not self.possible
            else f"physically possible ({self.lower_bound_s / self.claimed_step_s:.0%} of peak "
            "would be needed)"
        )
        text = (
            f"claim {self.steps_per_s:g} steps/s = {self.claimed_step_s:.3f} s per step. "
            f"Lower bound: {self.lower_bound_s:.3f} s per step (the step's fewest FLOPs at "
            f"{cluster.num_gpus} x {gpu.peak_flops / 1e12:g} TFLOP/s dense BF16 peak, no "
            f"communication, no bubble). The claim is {verdict}."
        )
        if self.predicted_step_s is not None:
            text += f" The planner's best plan takes {self.predicted_step_s:.3f} s per step."
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps_per_s": self.steps_per_s,
            "claimed_step_s": self.claimed_step_s,
            "lower_bound_step_s": self.lower_bound_s,
            "predicted_step_s": self.predicted_step_s,
            "possible": self.possible,
        }


def check_claim(
    model: ModelSpec,
    cluster: Cluster,
    training: TrainingSpec,
    steps_per_s: float,
    best: Plan | None = None,
) -> Claim:
    """Whether ``steps_per_s`` optimizer steps per second can be reached at all."""
    if steps_per_s <= 0:
        raise PlanError(f"--claim-steps-per-s must be > 0, got {steps_per_s}")
    return Claim(
        steps_per_s=steps_per_s,
        claimed_step_s=1.0 / steps_per_s,
        lower_bound_s=lower_bound_step_time(model, cluster, training),
        predicted_step_s=best.time.step_s if best else None,
    )


def what_would_fit(
    model: ModelSpec,
    cluster: Cluster,
    training: TrainingSpec,
    constants: Constants = DEFAULT_CONSTANTS,
) -> list[Suggestion]:
    """Alternatives that fit (see the module docstring); empty when none of them does."""
    found: list[Suggestion] = []
    for factor in (2, 4, 8, 16):
        bigger = replace(cluster, nodes=cluster.nodes * factor)
        best = _best(model, bigger, training, constants)
        if best is not None:
            found.append(Suggestion(
                f"{bigger.nodes} nodes of {cluster.gpus_per_node} {cluster.gpu.name} "
                f"({bigger.num_gpus} GPUs)", best,
            ))
            break
    if training.mode == "full":
        lora = replace(training, mode="lora")
        best = _best(model, cluster, lora, constants)
        if best is not None:
            found.append(Suggestion(
                f"LoRA fine-tuning (rank {training.lora_rank}, frozen base weights) on the "
                f"same {cluster.num_gpus} GPUs", best,
            ))
    own_network = cluster.gpu.network_bandwidth != get_gpu(cluster.gpu.name).network_bandwidth
    for name in catalog_gpus():
        gpu = get_gpu(name)
        if gpu.memory_gib <= cluster.gpu.memory_gib:
            continue
        other = replace(cluster, gpu=gpu)
        if own_network:  # the cluster's network stays when its GPUs change
            other = other.with_node_network(cluster.node_network_gbps)
        best = _best(model, other, training, constants)
        if best is not None:
            found.append(Suggestion(
                f"{cluster.nodes} node(s) of {cluster.gpus_per_node} {gpu.name} "
                f"({gpu.memory_gib:g} GiB)", best,
            ))
    return found


def _best(
    model: ModelSpec, cluster: Cluster, training: TrainingSpec, constants: Constants
) -> Plan | None:
    try:
        return search(model, cluster, training, constants=constants).best
    except PlanError:
        return None
