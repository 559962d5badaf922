"""Plans as JSON-ready dicts and as text: one plan's breakdown, ranked tables, layouts.

Every figure is labelled: TFLOP/s and MFU name the FLOP count, bubble fractions say which way
they are counted.
"""

from __future__ import annotations

from typing import Any

from stagewise.plan.evaluate import Plan
from stagewise.plan.export import export_notes, megatron_command, torchtitan_toml
from stagewise.plan.flops import MODEL_FLOPS_NAME
from stagewise.plan.memory import GIB

AT_RISK_GIB = 2.0  # a plan with less free memory than this at its peak is marked at risk

__all__ = [
    "AT_RISK_GIB",
    "best_per_layout",
    "describe_plan",
    "plan_row",
    "plan_to_dict",
    "table",
]


def plan_to_dict(
    plan: Plan,
    tokens: float | None = None,
    price: float | None = None,
    megatron: bool = False,
    torchtitan: bool = False,
    margin_gib: float = AT_RISK_GIB,
) -> dict[str, Any]:
    """Everything about ``plan`` a script would read (the ``--json`` form)."""
    cfg, time = plan.config, plan.time
    memory = plan.memory.in_gib()
    result: dict[str, Any] = {
        "tp": cfg.tp,
        "pp": cfg.pp,
        "dp": cfg.dp,
        "num_chunks": cfg.num_chunks,
        "micro_batch_size": cfg.micro_batch_size,
        "num_microbatches": plan.num_microbatches,
        "recompute": cfg.recompute,
        "sequence_parallel": cfg.sequence_parallel,
        "dp_sharding": cfg.dp_sharding,
        "mesh": cfg.mesh.text(),
        "schedule": cfg.schedule,
        "layer_split": cfg.layer_split,
        "layers_per_stage": list(plan.layers),
        "fits": plan.fits,
        "at_risk": plan.at_risk(margin_gib),
        "headroom_gib": plan.headroom_gib,
        "memory_gib": memory,
        "memory_rank": plan.memory.rank,
        "memory_limit_gib": plan.cluster.gpu.memory_gib,
        "step_time_s": time.step_s,
        "time_s": {
            "compute": time.compute_s,
            "tp_comm": time.tp_comm_s,
            "bubble": time.bubble_s,
            "dp_exposed": time.dp_exposed_s,
            "optimizer": time.optimizer_s,
            "embedding_sync": time.embedding_sync_s,
            "dp_total": time.dp_total_s,
            "pp_p2p_per_microbatch": time.pp_p2p_s,
        },
        "bubble_fraction": {"of_step": time.bubble.of_step, "vs_ideal": time.bubble.vs_ideal},
        "tokens_per_s": plan.tokens_per_s,
        "tflops_per_gpu": plan.tflops_per_gpu,
        "mfu": plan.mfu,
        "hfu": plan.hfu,
        "flops_counted": MODEL_FLOPS_NAME,
    }
    if not plan.fits:
        result["reason"] = plan.reason
    if tokens:
        result["run_hours"] = plan.run_hours(tokens)
        if price is not None:
            result["run_cost"] = plan.run_cost(tokens, price)
    if megatron:
        result["megatron"] = megatron_command(plan)
    if torchtitan:
        result["torchtitan"] = torchtitan_toml(plan)
    if megatron or torchtitan:
        result["export_notes"] = export_notes(plan)
    return result


def describe_plan(
    plan: Plan, tokens: float | None = None, price: float | None = None,
    margin_gib: float = AT_RISK_GIB,
) -> str:
    """A few lines: the configuration, speed, memory and step-time breakdowns."""
    cfg, time = plan.config, plan.time
    mem = plan.memory.in_gib()
    limit = plan.cluster.gpu.memory_gib
    lines = [
        f"  {cfg.describe()}  (m={plan.num_microbatches} micro-batches, layers per stage "
        f"{_layers(plan.layers)})",
        f"  step {time.step_s:.3f} s | {plan.tokens_per_s:,.0f} tokens/s | "
        f"{plan.tflops_per_gpu:.0f} TFLOP/s per GPU | MFU {plan.mfu:.1%} "
        f"(HFU {plan.hfu:.1%}; model FLOPs: {_flops_words(plan)})",
        f"  memory on pipeline rank {plan.memory.rank}: {mem['total']:.1f} of {limit:g} GiB = "
        f"weights {mem['weights']:.1f} + grads {mem['gradients']:.1f} + optimizer "
        f"{mem['optimizer']:.1f} + activations {mem['activations']:.1f} + logits "
        f"{mem['logits']:.1f} + recompute {mem['recompute_buffer']:.1f} + comm "
        f"{mem['comm_buffers']:.1f} + reserved {mem['reserved']:.1f}",
        f"  step time: compute {time.compute_s:.3f} + TP comm {time.tp_comm_s:.3f} + bubble "
        f"{time.bubble_s:.3f} + DP exposed {time.dp_exposed_s:.3f} (of {time.dp_total_s:.3f})"
        f" + optimizer {time.optimizer_s:.3f} + embedding sync {time.embedding_sync_s:.3f} s;"
        f" bubble {time.bubble.describe()}",
    ]
    if not plan.fits:
        lines.append(f"  does not fit: {plan.reason}")
    elif plan.at_risk(margin_gib):
        lines.append(f"  at risk: only {plan.headroom_gib:.1f} GiB free at the peak (margin "
                     f"{margin_gib:g} GiB): allocator peaks or a longer sequence may not fit")
    if tokens:
        hours = plan.run_hours(tokens)
        line = f"  {tokens:.3g} tokens: {hours:,.1f} h on {plan.cluster.num_gpus} GPUs"
        if price is not None:
            line += f", ${plan.run_cost(tokens, price):,.0f} at ${price:g} per GPU-hour"
        lines.append(line)
    return "\n".join(lines)


def _flops_words(plan: Plan) -> str:
    passes = 2 if plan.training.mode == "lora" else 3
    return (
        f"{2 * passes} x matmul weights + {4 * passes}·L·h·s per token"
        + (", LoRA: no base weight gradients" if passes == 2 else "")
    )


def _layers(layers: tuple[int, ...]) -> str:
    """Run-length form: ``2 x 4`` or ``1, 2 x 62, 1``."""
    runs: list[list[int]] = []
    for count in layers:
        if runs and runs[-1][0] == count:
            runs[-1][1] += 1
        else:
            runs.append([count, 1])
    return ", ".join(f"{c} x {n}" if n > 1 else str(c) for c, n in runs)


HEADER = (
    f"{'#':>3} {'TP':>3} {'PP':>4} {'DP':>5} {'v':>3} {'mbs':>3} {'recompute':>9} {'SP':>3} "
    f"{'shard':>9} {'schedule':>16} {'step s':>9} {'tokens/s':>10} {'TFLOP/s':>7} {'MFU':>6} "
    f"{'GiB':>6}  note"
)


def plan_row(
    index: int, plan: Plan, with_time: bool = True, margin_gib: float = AT_RISK_GIB
) -> str:
    """One table row for ``plan``."""
    cfg = plan.config
    head = (
        f"{index:>3} {cfg.tp:>3} {cfg.pp:>4} {cfg.dp:>5} {cfg.num_chunks:>3} "
        f"{cfg.micro_batch_size:>3} "
        f"{cfg.recompute:>9} {'y' if cfg.sequence_parallel else '-':>3} "
        f"{cfg.dp_sharding if cfg.dp_sharding != 'none' else '-':>9} {cfg.schedule:>16} "
    )
    if with_time:
        speed = (
            f"{plan.time.step_s:>9.3f} {plan.tokens_per_s:>10,.0f} {plan.tflops_per_gpu:>7.0f} "
            f"{plan.mfu:>6.1%} "
        )
    else:
        speed = f"{'':>9} {'':>10} {'':>7} {'':>6} "
    verdict = "does not fit" if not plan.fits else "at risk" if plan.at_risk(margin_gib) else ""
    split = f"{cfg.layer_split} split" if cfg.layer_split != "balanced" else ""
    note = ", ".join(word for word in (split, verdict) if word)
    return head + speed + f"{plan.memory.total / GIB:>6.1f}  {note}"


def table(plans: list[Plan], with_time: bool = True, margin_gib: float = AT_RISK_GIB) -> str:
    """A ranked table of ``plans``."""
    rows = [HEADER] + [plan_row(i + 1, p, with_time, margin_gib) for i, p in enumerate(plans)]
    return "\n".join(rows)


def best_per_layout(plans: list[Plan]) -> list[tuple[int, int, Plan]]:
    """For every (TP, PP) searched, its best plan: the fastest that fits, else the smallest."""
    best: dict[tuple[int, int], Plan] = {}
    for plan in plans:  # ranked: fitting by time first, then the rest by memory
        best.setdefault((plan.config.tp, plan.config.pp), plan)
    return [(tp, pp, plan) for (tp, pp), plan in sorted(best.items())]
