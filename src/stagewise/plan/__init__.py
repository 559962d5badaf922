"""The 3D-parallelism planner: which TP x PP x DP split fits, how fast it runs, how to launch it.

Data in, data out: a model (:func:`get_model`, :func:`model_from_hf_config`), a cluster
(:func:`get_gpu`, :class:`Cluster`) and a training run (:class:`TrainingSpec`) go in;
:func:`evaluate` predicts one :class:`ParallelConfig`, :func:`search` ranks them all, and the
exporters turn a :class:`Plan` into launch arguments or, with :func:`run_config`, into a
:class:`~stagewise.runconfig.RunConfig` that ``stagewise train --config`` runs. Pure Python:
importing this package imports neither torch nor matplotlib.
"""

from stagewise.plan.constants import DEFAULT_CONSTANTS, Constants
from stagewise.plan.emit import run_config
from stagewise.plan.evaluate import Plan, check_config, evaluate, lower_bound_step_time
from stagewise.plan.export import megatron_args, megatron_command, torchtitan_toml
from stagewise.plan.flops import MODEL_FLOPS_NAME, hardware_flops_per_token, model_flops_per_token
from stagewise.plan.hardware import Cluster, GpuSpec, catalog_gpus, get_gpu
from stagewise.plan.layer import LayerSetup, LayerTime, block_time
from stagewise.plan.layer_time import layer_time
from stagewise.plan.memory import MemoryBreakdown, layer_activation_bytes
from stagewise.plan.models import (
    ModelSpec,
    catalog_models,
    get_model,
    hf_family_and_config,
    model_from_hf_config,
    toy_model,
)
from stagewise.plan.pipeline_cache import PipelineCache
from stagewise.plan.search import SearchResult, candidates, search
from stagewise.plan.spec import ParallelConfig, TrainingSpec, split_layers
from stagewise.plan.steptime import StepTime

__all__ = [
    "DEFAULT_CONSTANTS",
    "MODEL_FLOPS_NAME",
    "Cluster",
    "Constants",
    "GpuSpec",
    "LayerSetup",
    "LayerTime",
    "MemoryBreakdown",
    "ModelSpec",
    "ParallelConfig",
    "PipelineCache",
    "Plan",
    "SearchResult",
    "StepTime",
    "TrainingSpec",
    "block_time",
    "candidates",
    "catalog_gpus",
    "catalog_models",
    "check_config",
    "evaluate",
    "get_gpu",
    "get_model",
    "hardware_flops_per_token",
    "hf_family_and_config",
    "layer_activation_bytes",
    "layer_time",
    "lower_bound_step_time",
    "megatron_args",
    "megatron_command",
    "model_flops_per_token",
    "model_from_hf_config",
    "run_config",
    "search",
    "split_layers",
    "torchtitan_toml",
    "toy_model",
]
