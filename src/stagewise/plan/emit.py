"""A plan as a run configuration that ``stagewise train --config`` executes.

:func:`run_config` keeps the plan's mesh (TP inside a node, PP, DP), schedule, chunks,
micro-batches, micro-batch size, batch, sequence length and recompute choice, and names the
planned model as a Hugging Face config (``hf:llama`` or ``hf:gpt2``), so the same file runs
under torchrun on the planned cluster. With ``toy=True`` the model is shrunk to a tiny one of
the same family (:func:`~stagewise.plan.models.toy_model`) and the sequence to at most
:data:`TOY_SEQ` tokens, everything else unchanged: the plan's layout rehearsed on one machine
with ``pp x dp x tp`` local processes.

The file's ``[source]`` section records the prediction and, as notes, where the stagewise
runtime differs from what was planned (sequence parallelism, the distributed optimizer, bf16).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from stagewise.errors import PlanError
from stagewise.plan.evaluate import Plan
from stagewise.plan.memory import GIB
from stagewise.plan.models import ModelSpec, hf_family_and_config, toy_model
from stagewise.runconfig import (
    BatchConfig,
    ModelConfig,
    RunConfig,
    ScheduleConfig,
    SourceInfo,
    TrainingConfig,
)

__all__ = ["TOY_SEQ", "run_config", "run_notes"]

TOY_SEQ = 32  # tokens per sequence of a toy run (at most)


def run_config(
    plan: Plan,
    steps: int = 30,
    lr: float = 3e-3,
    toy: bool = False,
    hf_config: Mapping[str, Any] | None = None,
) -> RunConfig:
    """The :class:`RunConfig` that trains ``plan`` with ``stagewise train``.

    Args:
        plan: a planned configuration (``search(...).best``).
        steps, lr: the training steps and AdamW learning rate (not planned).
        toy: shrink the model (and the sequence) but keep the layout, to rehearse the plan
            on one machine.
        hf_config: the Hugging Face config the plan's model was read from, if any: its
            other fields (rotary base, norm epsilon, ...) are kept beside the planned shape
            (ignored with ``toy``; ``model_type`` and null fields are dropped).

    Raises:
        PlanError: the plan recomputes selectively (the runtime recomputes whole layers
            only), or its model is neither a Llama nor a GPT-2 shape.

    Example:
        >>> from stagewise.plan import Cluster, TrainingSpec, get_gpu, get_model, search
        >>> best = search(get_model("tiny-llama"), Cluster(get_gpu("cpu"), 1, 4),
        ...               TrainingSpec(seq_len=32, global_batch=8), {"pp": 2, "tp": 2}).best
        >>> run_config(best).train_args()[:2]
        ['--mesh', 'pp=2,dp=1,tp=2']
    """
    cfg, training = plan.config, plan.training
    if cfg.recompute not in ("none", "full"):
        raise PlanError(
            f"the plan recomputes {cfg.recompute!r}, but stagewise train recomputes whole "
            "layers only: plan again with --recompute none or --recompute full"
        )
    # the run's dropout (--dropout) is what was planned, whatever the model's own setting
    model: ModelSpec = replace(plan.model, dropout=training.uses_dropout(plan.model))
    seq = training.seq_len
    if toy:
        model = toy_model(model, cfg.pp * cfg.num_chunks, cfg.tp)
        seq = min(seq, TOY_SEQ)
    family, fields = hf_family_and_config(model)
    if hf_config is not None and not toy:
        kept = _without_nulls({k: v for k, v in hf_config.items() if k != "model_type"})
        fields = {**kept, **fields}
    for key in ("max_position_embeddings", "n_positions"):  # as Megatron's export: >= seq
        if key in fields:
            fields[key] = max(fields[key], seq)
    time = plan.time.step_s if plan.fits else 0.0
    notes = run_notes(plan, family)
    kind = (hf_config or {}).get("model_type")
    if kind not in (None, family, "mistral" if family == "llama" else family):
        notes.append(f"the run builds Hugging Face {family} blocks of the planned shapes, not "
                     f"{kind}'s own (its norms, activation and biases may differ); to fine-tune "
                     f"the {kind} model itself give stagewise train its folder (--model PATH)")
    if toy:
        notes.insert(0, f"toy run: {plan.model.name} shrunk to {model.layers} layers of width "
                     f"{model.hidden}, sequences of {seq} tokens; the predictions above are "
                     "for the planned model")
    return RunConfig(
        mesh=cfg.mesh,
        schedule=ScheduleConfig(cfg.schedule, num_chunks=cfg.num_chunks,
                                num_microbatches=plan.num_microbatches),
        batch=BatchConfig(global_batch=training.global_batch,
                          micro_batch_size=cfg.micro_batch_size, seq_len=seq),
        training=TrainingConfig(steps=steps, lr=lr, recompute=cfg.recompute),
        model=ModelConfig(f"hf:{family}", hf_config=fields),
        source=SourceInfo(
            planner="stagewise plan", model=plan.model.name, gpu=plan.cluster.gpu.name,
            nodes=plan.cluster.nodes, gpus_per_node=plan.cluster.gpus_per_node,
            configuration=f"{cfg.describe()} (m={plan.num_microbatches}, layers per stage "
            f"{_layers(plan.layers)})",
            predicted_step_s=time,
            memory_per_gpu_gib=round(plan.memory.total / GIB, 3),
            notes=tuple(notes),
        ),
    )


def run_notes(plan: Plan, family: str) -> list[str]:
    """Where ``stagewise train`` runs ``plan`` differently from what was planned."""
    cfg, training = plan.config, plan.training
    notes = ["planned for bf16 weights with fp32 gradients and Adam state; stagewise train "
             "keeps the model's float32 parameters and AdamW state"]
    if cfg.sequence_parallel:
        notes.append("planned with sequence parallelism; stagewise train keeps activations "
                     "outside the blocks whole on every TP rank (more activation memory)")
    if cfg.dp_sharding in ("optimizer", "gradients"):
        notes.append(f"planned with the optimizer state sharded over DP={cfg.dp}; this file "
                     "runs plain dp (the whole optimizer state on every replica); "
                     f"--mesh pp={cfg.pp},fsdp={cfg.dp}" + (f",tp={cfg.tp}" if cfg.tp > 1 else "")
                     + " shards it (FSDP2 shards parameters and gradients too; not for "
                     "zero-bubble schedules or tied embeddings)")
    if training.mode == "lora":
        notes.append("planned as LoRA fine-tuning; stagewise train trains every weight")
    if training.engine == "deepspeed":
        notes.append("timed for DeepSpeed's pipeline engine; stagewise train's own runtime "
                     "(asynchronous transfers, no fp32 gradient copy) runs it faster")
    if len(set(plan.layers)) > 1:
        notes.append("the planned layers per stage are uneven; stagewise train cuts the "
                     "layers by its --partition rule (embedding and head included)")
    if family == "gpt2" and cfg.tp > 1:
        notes.append("stagewise train's tensor parallelism shards Llama-style blocks only, not "
                     "GPT-2's fused attention")
    if not plan.fits:
        notes.append(f"the plan does not fit: {plan.reason}")
    return notes


def _layers(layers: tuple[int, ...]) -> str:
    """``10 x 8`` for an even split, else each stage's count."""
    if len(set(layers)) == 1:
        return f"{layers[0]} x {len(layers)}"
    return " ".join(str(n) for n in layers)


def _without_nulls(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` without null values, in nested tables too (TOML has no null)."""
    return {
        key: _without_nulls(value) if isinstance(value, Mapping) else value
        for key, value in fields.items() if value is not None
    }
