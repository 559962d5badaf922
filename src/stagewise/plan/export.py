"""Launch arguments for a plan: a Megatron-LM command line and a torchtitan TOML config.

Megatron-LM runs 1F1B and interleaved 1F1B itself; for other stagewise schedules the line
carries the nearest one and :func:`export_notes` says so. torchtitan runs any schedule that
torch.distributed.pipelining knows by name, and others from a CSV (stagewise writes the same
format: ``build(...).save_csv(path)``).
"""

from __future__ import annotations

import re
import shlex

from stagewise.plan.evaluate import Plan
from stagewise.plan.models import ModelSpec

__all__ = ["export_notes", "megatron_args", "megatron_command", "torchtitan_toml"]

TORCH_SCHEDULES = {
    "gpipe": "GPipe",
    "1f1b": "1F1B",
    "interleaved-1f1b": "Interleaved1F1B",
    "looped-bfs": "LoopedBFS",
    "zb-v": "ZBVZeroBubble",
    "dualpipev": "DualPipeV",
}


def _uneven_layers(plan: Plan) -> tuple[int, int] | None:
    """(first, last) stage layers when the split is uneven, else None."""
    layers = plan.layers
    return None if len(set(layers)) == 1 else (layers[0], layers[-1])


def _even_middle(plan: Plan) -> bool:
    """Whether every stage but the first and the last holds the same layers: the only uneven
    split Megatron's ``--decoder-first/last-pipeline-num-layers`` can express."""
    return len(set(plan.layers[1:-1])) <= 1


def _edges_split(plan: Plan) -> bool:
    """Whether the layers are Megatron's account-for-embedding-and-loss split: layers + 2
    slots even over the stages, the first and the last giving one slot to the embedding and
    the loss (Megatron asks for layers + 2 divisible by pp x virtual stages)."""
    layers, stages = plan.layers, len(plan.layers)
    if stages < 2 or (plan.model.layers + 2) % stages:
        return False
    share = (plan.model.layers + 2) // stages
    return layers == (share - 1,) + (share,) * (stages - 2) + (share - 1,)


def megatron_args(plan: Plan) -> list[str]:
    """Megatron-LM ``pretrain_gpt.py`` arguments for ``plan`` (model shape included).

    Example:
        >>> from stagewise.plan import (Cluster, ParallelConfig, TrainingSpec, evaluate,
        ...                             get_gpu, get_model)
        >>> plan = evaluate(get_model("llama-2-7b"), Cluster(get_gpu("h100"), 1, 8),
        ...                 TrainingSpec(seq_len=4096, global_batch=16),
        ...                 ParallelConfig.of(tp=4, pp=2, dp=1, micro_batch_size=1))
        >>> megatron_args(plan)[:4]
        ['--tensor-model-parallel-size', '4', '--pipeline-model-parallel-size', '2']
    """
    return [
        *_layout_args(plan),
        *_memory_args(plan),
        *_shape_args(plan),
        *_architecture_args(plan),
        "--bf16",
    ]


def _layout_args(plan: Plan) -> list[str]:
    """TP and PP sizes, and how layers split over stages (virtual or uneven)."""
    cfg = plan.config
    args = [
        "--tensor-model-parallel-size", str(cfg.tp),
        "--pipeline-model-parallel-size", str(cfg.pp),
    ]
    uneven = _uneven_layers(plan)
    if cfg.num_chunks > 1 and _edges_split(plan):
        args += ["--num-virtual-stages-per-pipeline-rank", str(cfg.num_chunks),
                 "--account-for-embedding-in-pipeline-split",
                 "--account-for-loss-in-pipeline-split"]
    elif cfg.num_chunks > 1 and uneven is None:
        args += ["--num-layers-per-virtual-pipeline-stage", str(plan.layers[0])]
    elif uneven is not None and cfg.num_chunks == 1 and _even_middle(plan):
        args += ["--decoder-first-pipeline-num-layers", str(uneven[0]),
                 "--decoder-last-pipeline-num-layers", str(uneven[1])]
    return args


def _memory_args(plan: Plan) -> list[str]:
    """Sequence parallelism, data-parallel sharding, recomputation and gradient overlap."""
    cfg, run = plan.config, plan.training
    args = []
    if cfg.sequence_parallel:
        args.append("--sequence-parallel")
    if cfg.dp_sharding == "weights":
        args.append("--use-torch-fsdp2")
    elif cfg.shards("optimizer"):
        args.append("--use-distributed-optimizer")
    if cfg.recompute == "selective":
        args.append("--recompute-activations")
    elif cfg.recompute == "full":
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "1"]
    if run.dp_overlap and cfg.dp > 1:
        args.append("--overlap-grad-reduce")
    return args


def _shape_args(plan: Plan) -> list[str]:
    """Batch, sequence and model sizes."""
    model, cfg, run = plan.model, plan.config, plan.training
    return [
        "--micro-batch-size", str(cfg.micro_batch_size),
        "--global-batch-size", str(run.global_batch),
        "--seq-length", str(run.seq_len),
        "--max-position-embeddings", str(max(run.seq_len, model.max_seq_len)),
        "--num-layers", str(model.layers),
        "--hidden-size", str(model.hidden),
        "--ffn-hidden-size", str(model.ffn),
        "--num-attention-heads", str(model.heads),
        "--vocab-size", str(model.vocab),
    ]


def _architecture_args(plan: Plan) -> list[str]:
    """The model family's choices: attention groups, MLP, norm, positions, biases, dropout."""
    model, run = plan.model, plan.training
    args = []
    if model.kv_heads != model.heads:
        args += ["--group-query-attention", "--num-query-groups", str(model.kv_heads)]
    if model.head_dim * model.heads != model.hidden:
        args += ["--kv-channels", str(model.head_dim)]
    if model.mlp == "swiglu":
        args.append("--swiglu")
    if model.norm == "rmsnorm":
        args += ["--normalization", "RMSNorm"]
    if model.position == "rope":
        args += ["--position-embedding-type", "rope"]
    if not model.tied_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    if not model.bias:
        args.append("--disable-bias-linear")
    if not run.uses_dropout(model):
        args += ["--attention-dropout", "0.0", "--hidden-dropout", "0.0"]
    if run.attention == "flash":
        args.append("--use-flash-attn")
    return args


def megatron_command(plan: Plan) -> str:
    """The whole ``torchrun ... pretrain_gpt.py ...`` line, shell-quoted."""
    cluster = plan.cluster
    launcher = [
        "torchrun", "--nnodes", str(cluster.nodes), "--nproc-per-node",
        str(cluster.gpus_per_node), "pretrain_gpt.py",
    ]
    return shlex.join(launcher + megatron_args(plan))


def _model_notes(model: ModelSpec) -> list[str]:
    """What of ``model`` the launch lines cannot say."""
    notes = []
    if model.position == "alibi":
        notes.append("Megatron-LM and torchtitan have no ALiBi: the lines use their own "
                     "position embedding (Megatron-DeepSpeed: --position-embedding-type alibi)")
    if model.q_dim != model.hidden:
        notes.append(f"heads {model.head_dim} wide, not hidden / heads: Megatron-LM's "
                     "--kv-channels carries it; torchtitan's Llama derives the head width from "
                     "dim / n_heads, so it needs a model of its own")
    if not re.fullmatch(r"llama-\d(?:\.\d)?-\d+b", model.name):
        notes.append(f"torchtitan has no flavor {model.name!r}: register the model's "
                     "arguments under that name")
    return notes


def export_notes(plan: Plan) -> list[str]:
    """Caveats of the exported launch arguments for ``plan`` (empty when exact)."""
    notes = []
    cfg = plan.config
    if not plan.fits:
        notes.append(f"this plan does NOT fit and will run out of memory: {plan.reason}")
    if plan.training.engine == "deepspeed":
        notes.append("timed for DeepSpeed's pipeline engine (--engine deepspeed): Megatron-LM "
                     "and torchtitan run the same layout faster (asynchronous transfers, fused "
                     "fp32 gradient accumulation, overlapped DP reduction)")
    if plan.training.engine == "pytorch":
        notes.append("timed for a PyTorch-native runtime (--engine pytorch): Megatron-LM's "
                     "vocabulary-parallel loss moves more bytes per logit, so its head runs a "
                     "little slower than planned")
    notes += _model_notes(plan.model)
    if cfg.schedule not in ("1f1b", "interleaved-1f1b") and cfg.pp > 1:
        nearest = "interleaved 1F1B" if cfg.num_chunks > 1 else "1F1B"
        notes.append(
            f"Megatron-LM has no {cfg.schedule} schedule: the line runs {nearest}; "
            "use torchtitan with the exported schedule instead"
        )
    if cfg.num_chunks > 1 and _uneven_layers(plan) is not None and not _edges_split(plan):
        notes.append("layers do not split evenly into virtual stages: set the split by hand")
    elif cfg.num_chunks == 1 and _uneven_layers(plan) is not None and not _even_middle(plan):
        notes.append(f"the middle stages hold unequal layers {plan.layers[1:-1]}, which "
                     "Megatron-LM's --decoder-first/last-pipeline-num-layers cannot express: "
                     "set the split by hand")
    if cfg.pp > 1 and not _torchtitan_split(plan):
        notes.append(f"torchtitan's layers_per_stage cannot express the layers {plan.layers}: "
                     "list them in parallelism.module_fqns_per_model_part")
    if cfg.tp > 1 and not cfg.sequence_parallel:
        notes.append("torchtitan always shards the sequence over TP (sequence parallel)")
    if cfg.dp_sharding == "gradients":
        notes.append("Megatron-LM's distributed optimizer shards the optimizer state only "
                     "(ZeRO-1): the line keeps whole fp32 gradients, more memory than planned")
    if cfg.dp_sharding in ("optimizer", "gradients"):
        notes.append("torchtitan shards over DP with FSDP, which also shards weights and "
                     "gradients: less memory than the planned distributed optimizer")
    return notes


def _torchtitan_model(plan: Plan) -> tuple[str, str]:
    """torchtitan's (model name, flavor): ``llama-3-70b`` -> (``llama3``, ``70B``)."""
    found = re.fullmatch(r"llama-(\d)(?:\.\d)?-(\d+)b", plan.model.name)
    if found:
        return f"llama{found.group(1)}", f"{found.group(2)}B"
    return "llama3", plan.model.name


def _torchtitan_split(plan: Plan) -> dict[str, object]:
    """torchtitan's keys for the plan's layer split, where they express it exactly.

    torchtitan makes ceil((layers + first + last) / layers_per_stage) stages, the embedding
    and the output counted as ``pipeline_parallel_first/last_stage_less_layers`` layers (1 by
    default): the ``edges`` split with its slots even is layers_per_stage = (layers + 2) /
    stages with both at 1; an even ``balanced`` split is layers / stages with both at 0.
    Other splits get no keys (``export_notes`` says so)."""
    layers, stages = plan.layers, len(plan.layers)
    if _edges_split(plan):
        share = (plan.model.layers + 2) // stages
        return {"pipeline_parallel_layers_per_stage": share,
                "pipeline_parallel_first_stage_less_layers": 1,
                "pipeline_parallel_last_stage_less_layers": 1}
    if len(set(layers)) == 1:
        return {"pipeline_parallel_layers_per_stage": layers[0],
                "pipeline_parallel_first_stage_less_layers": 0,
                "pipeline_parallel_last_stage_less_layers": 0}
    return {}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def torchtitan_toml(plan: Plan) -> str:
    """A torchtitan job config (TOML) for ``plan``: model, training and parallelism sections."""
    cfg, run, model = plan.config, plan.training, plan.model
    family, flavor = _torchtitan_model(plan)
    parallelism: dict[str, object] = {
        "data_parallel_replicate_degree": 1 if cfg.shards("optimizer") else cfg.dp,
        "data_parallel_shard_degree": cfg.dp if cfg.shards("optimizer") else 1,
        "tensor_parallel_degree": cfg.tp,
        "pipeline_parallel_degree": cfg.pp,
        "context_parallel_degree": 1,
    }
    if cfg.pp > 1:
        parallelism["pipeline_parallel_microbatch_size"] = cfg.micro_batch_size
        parallelism.update(_torchtitan_split(plan))
        if cfg.schedule in TORCH_SCHEDULES:
            parallelism["pipeline_parallel_schedule"] = TORCH_SCHEDULES[cfg.schedule]
        else:
            parallelism["pipeline_parallel_schedule_csv"] = (
                f"{cfg.schedule}-p{cfg.pp}-m{plan.num_microbatches}-v{cfg.num_chunks}.csv"
            )
    sections: dict[str, dict[str, object]] = {
        "job": {"description": f"{model.name}: {cfg.describe()} (stagewise plan)"},
        "model": {"name": family, "flavor": flavor},
        "training": {
            "local_batch_size": run.global_batch // cfg.dp,
            "global_batch_size": run.global_batch,
            "seq_len": run.seq_len,
        },
        "parallelism": parallelism,
        "activation_checkpoint": {"mode": cfg.recompute},
    }
    if cfg.recompute == "selective":
        sections["activation_checkpoint"]["selective_ac_option"] = "op"
    lines = [f"# torchtitan config generated by stagewise plan for {plan.cluster.num_gpus} GPUs"]
    for note in export_notes(plan):
        lines.append(f"# note: {note}")
    for name, values in sections.items():
        lines.append("")
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"
