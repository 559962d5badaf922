"""Published training runs as planner inputs: one :class:`Case` per scored row of benchmarks/data.

Sources (``benchmarks/data/README.md`` says what each file holds):

- ``calibration_runs.json``: Korthikanti et al. 2022, A100 (Megatron-LM 2022: unfused attention
  with dropout, no overlap of the DP all-reduce); every knob is published, so it is evaluated
  as given.
- ``a100_runs.json``: Narayanan et al. 2021, Table 1 (A100, full recomputation); micro-batch
  size and virtual stages are not published, so the planner chooses them: a search with TP,
  PP, DP and recomputation held. That Megatron-LM's backward TP all-reduces were synchronous
  (``Constants.tp_overlap`` ``"none"``).
- ``published_runs.json``: NVIDIA NeMo performance tables (H100, FP8), Meta's Llama 3 405B
  (H100, BF16) and MosaicML LLM Foundry's MPT benchmarks (H100, BF16 and FP8, PyTorch FSDP).
  Knobs a row does not state (recomputation, or micro-batch and virtual stages) are chosen by
  a search with the stated ones held, as a user of the planner would; a stated recomputation
  ("none" or "full") is held.
  A row's ``tp_comm_overlap`` (NeMo's TP > 1 rows: ``"all"``, Transformer Engine's userbuffers,
  cited in the row) sets ``Constants.tp_overlap``, its ``param_gather_overlap`` (NeMo's rows:
  ``overlap_param_sync``) ``Constants.param_gather_overlap``, its ``attention_kernel``
  (LLM Foundry's: the Triton flash kernel of 2023) the flash rate (:func:`with_attention_kernel`).

Each case knows its source family: leave-one-source-out leaves a family out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stagewise.errors import PlanError
from stagewise.plan import (
    DEFAULT_CONSTANTS,
    Cluster,
    Constants,
    ModelSpec,
    ParallelConfig,
    TrainingSpec,
    evaluate,
    get_gpu,
    get_model,
)
from stagewise.plan.hardware import GpuSpec
from stagewise.plan.search import search

DATA = Path(__file__).resolve().parent / "data"
Inputs = tuple[ModelSpec, Cluster, TrainingSpec, dict[str, Any]]


@dataclass(frozen=True)
class Case:
    """One published run: its source, its measured step time and how to predict it."""

    id: str
    source: str
    gpu: str
    precision: str
    measured_s: float
    predict: Callable[[Constants], float]


def gpt_model(run: dict[str, Any], name: str | None = None) -> ModelSpec:
    """A Megatron GPT (GELU MLP, LayerNorm, learned positions, tied embeddings, dropout)."""
    return ModelSpec(
        name=name or run["model"], layers=run["layers"], hidden=run["hidden"],
        heads=run["heads"], kv_heads=run["kv_heads"] or run["heads"], ffn=run["ffn"],
        vocab=run["vocab"], mlp="gelu", norm="layernorm", tied_embeddings=True,
        position="learned", bias=True, dropout=True, max_seq_len=run["seq_len"],
    )


def calibration_inputs(
    run: dict[str, Any],
) -> tuple[ModelSpec, Cluster, TrainingSpec, ParallelConfig]:
    """The planner's inputs for one Korthikanti et al. entry, taken from the entry alone."""
    cluster = Cluster.of_gpus(get_gpu("A100-SXM4-80GB"), run["num_gpus"])
    training = TrainingSpec(seq_len=run["seq_len"], global_batch=run["global_batch_size"],
                            attention="unfused", dp_overlap=False)
    config = ParallelConfig.of(
        tp=run["tp"], pp=run["pp"], dp=run["dp"], num_chunks=run["vp"],
        micro_batch_size=run["micro_batch_size"],
        recompute="full" if run["recompute"].startswith("full") else "selective",
        sequence_parallel=run["sequence_parallel"],
        schedule="interleaved-1f1b" if run["vp"] > 1 else "1f1b",
    )
    return gpt_model(run), cluster, training, config


def _best_of_search(
    model: ModelSpec, cluster: Cluster, training: TrainingSpec, fixed: dict[str, Any],
    constants: Constants,
) -> float:
    """Step seconds of the fastest fitting plan holding ``fixed`` (both 1F1B schedules when
    the schedule is not given), inf when none fits."""
    options: list[dict[str, Any]] = [{}]
    if "schedule" not in fixed:
        options = [{"schedule": "1f1b", "num_chunks": 1}]
        if fixed.get("pp", 1) > 1:  # uneven stages allowed, as Megatron allows them; a v
            # no split can take is refused by the search (PlanError, skipped below)
            options += [{"schedule": "interleaved-1f1b", "num_chunks": v} for v in (2, 4, 8)]
    best = float("inf")
    for option in options:
        try:
            plan = search(model, cluster, training, {**fixed, **option}, constants,
                          exact_top=1).best
        except PlanError:
            continue
        if plan is not None:
            best = min(best, plan.time.step_s)
    return best


def _calibration_cases() -> list[Case]:
    cases = []
    for run in json.loads((DATA / "calibration_runs.json").read_text()):
        def predict(c: Constants, run: dict[str, Any] = run) -> float:
            return evaluate(*calibration_inputs(run), c).time.step_s
        cases.append(Case(run["id"], "korthikanti22", "A100", "bf16",
                          run["measured"]["iteration_time_s"], predict))
    return cases


def _a100_case(run: dict[str, Any]) -> Case:
    """A row of ``a100_runs.json`` (full recomputation, unfused attention, no DP overlap, the
    Megatron-LM of 2021 whose backward TP all-reduces were synchronous: the asynchronous one
    came late that year); a row that names its schedule holds it."""
    model = gpt_model(run, run["id"])
    cluster = Cluster.of_gpus(get_gpu("A100-SXM4-80GB"), run["num_gpus"])
    engine = run.get("engine", "megatron")
    training = TrainingSpec(seq_len=run["seq_len"], global_batch=run["global_batch"],
                            attention="unfused", dp_overlap=False, engine=engine)
    fixed = {"tp": run["tp"], "pp": run["pp"], "dp": run["dp"], "recompute": "full",
             "sequence_parallel": False,
             "dp_sharding": "optimizer" if engine == "deepspeed" else "none"}
    if "schedule" in run:
        fixed.update(schedule=run["schedule"], num_chunks=run["num_chunks"])

    def predict(c: Constants, inputs: Inputs = (model, cluster, training, fixed)) -> float:
        return _best_of_search(*inputs, replace(c, tp_overlap="none"))
    return Case(run["id"], run["source_id"], "A100", "bf16", run["step_time_s"], predict)


def _narayanan_cases() -> list[Case]:
    runs = json.loads((DATA / "a100_runs.json").read_text())["runs"]
    return [_a100_case(run) for run in runs if run.get("scored", True)]


def reference_cases() -> list[Case]:
    """Rows kept out of the score (``reference``: true) but predicted for the record."""
    runs = json.loads((DATA / "a100_runs.json").read_text())["runs"]
    return [_a100_case(run) for run in runs if run.get("reference", False)]


def published_model(run: dict[str, Any]) -> ModelSpec:
    """The catalog model a row names, or the architecture it carries."""
    arch = run.get("architecture")
    if arch is None:
        return get_model(run["model"])
    fields = {k: v for k, v in arch.items() if k != "source"}
    return ModelSpec(name=run["model"], max_seq_len=run["seq_len"], **fields)


def published_inputs(run: dict[str, Any]) -> Inputs:
    """Model, cluster, run and the knobs the row states (the search chooses the others)."""
    model = published_model(run)
    cluster = Cluster.of_gpus(get_gpu(run["gpu"]), run["num_gpus"])
    if "node_network_gbps" in run:  # a cluster whose network is not the reference node's
        cluster = cluster.with_node_network(run["node_network_gbps"])
    training = TrainingSpec(seq_len=run["seq_len"], global_batch=run["global_batch"],
                            attention=run.get("attention", "flash"),
                            precision=run["precision"], grad_bytes=run.get("grad_bytes", 4),
                            engine=run.get("engine", "megatron"))
    fixed: dict[str, Any] = {"tp": run["tp"], "pp": run["pp"], "dp": run["dp"],
                             "sequence_parallel": run.get("sequence_parallel", run["tp"] > 1)}
    if isinstance(run["micro_batch_size"], int):
        fixed["micro_batch_size"] = run["micro_batch_size"]
    if isinstance(run["num_chunks"], int):
        fixed["num_chunks"] = run["num_chunks"]
        fixed["schedule"] = "interleaved-1f1b" if run["num_chunks"] > 1 else "1f1b"
    if "layer_split" in run:
        fixed["layer_split"] = str(run["layer_split"]).split(" ")[0]
    sharding = str(run.get("dp_sharding", "optimizer")).split(" ")[0]
    fixed["dp_sharding"] = sharding if run["dp"] > 1 else "none"
    for stated in ("none", "full"):
        if str(run["recompute"]).startswith(stated):
            fixed["recompute"] = stated
    return model, cluster, training, fixed


FLASH_ATTN_2_HOPPER_SHARE = 0.35
"""FlashAttention-2's forward rate on H100 as a share of the BF16 peak: "FlashAttention-2
achieves only 35% utilization on H100 GPUs" (Shah et al. 2024, "FlashAttention-3",
arXiv:2407.08608, abstract; FlashAttention-3 reaches 75 %). The planner's own flash rate
stands for the Hopper kernels NeMo and Megatron run (cuDNN, FlashAttention-3)."""

TRITON_2023_SLOWDOWN = (1.4, 2.0)
"""How much slower than FlashAttention-2 the Triton flash-attention kernel of 2023 (MPT's
``attn_impl: triton``, the pre-MLIR Triton fork) runs, forward and backward: "around
1.3-1.5x faster than FlashAttention in Triton in the forward pass and around 2x faster in the
backward pass" (Dao 2023, "FlashAttention-2", arXiv:2307.08691, sec. 4.1, on A100; neither
kernel uses Hopper's wgmma or TMA, so the ratios are taken to hold on H100)."""


def with_attention_kernel(c: Constants, kernel: str | None, gpu: GpuSpec) -> Constants:
    """``c`` with the flash rate of the attention kernel a row names, where it differs from the
    planner's. ``flash-attn-2``: on a Hopper GPU (FP8 tensor cores) forward at
    ``FLASH_ATTN_2_HOPPER_SHARE`` of the peak, whatever ``matmul_efficiency`` is fitted to,
    its backward at the planner's share of that; elsewhere the planner's own flash rate (its
    ``flash_efficiency`` is FlashAttention-2's on A100). ``triton-2023``: slower than
    FlashAttention-2 on the same GPU by ``TRITON_2023_SLOWDOWN`` (forward, backward). Other
    kernels keep ``c``."""
    if kernel not in ("flash-attn-2", "triton-2023"):
        return c
    fa2 = c
    if gpu.has_fp8:
        sustained = c.matmul_efficiency * gpu.achievable_gemm_flops()
        fa2 = replace(c, flash_efficiency=FLASH_ATTN_2_HOPPER_SHARE * gpu.peak_flops / sustained)
    if kernel == "flash-attn-2":
        return fa2
    forward, backward = TRITON_2023_SLOWDOWN
    return replace(fa2, flash_efficiency=fa2.flash_efficiency / forward,
                   flash_backward_share=fa2.flash_backward_share * forward / backward)


def _published_cases() -> list[Case]:
    cases = []
    for run in json.loads((DATA / "published_runs.json").read_text())["runs"]:
        if not run.get("scored", True):
            continue
        inputs = published_inputs(run)
        overlap = run.get("tp_comm_overlap", DEFAULT_CONSTANTS.tp_overlap)
        kernel = run.get("attention_kernel")
        gather = bool(run.get("param_gather_overlap", False))

        def predict(c: Constants, inputs: Inputs = inputs, overlap: str = overlap,
                    kernel: str | None = kernel, gather: bool = gather) -> float:
            c = with_attention_kernel(c, kernel, inputs[1].gpu)
            return _best_of_search(*inputs, replace(c, tp_overlap=overlap,
                                                    param_gather_overlap=gather))
        gpu = run["gpu"].split("-")[0]
        cases.append(Case(run["id"], run["source_family"], gpu, run["precision"],
                          run["step_time_s"], predict))
    return cases


def load_cases() -> list[Case]:
    """Every scored run of every source."""
    return _calibration_cases() + _narayanan_cases() + _published_cases()


def with_efficiency(c: Constants, value: float) -> Constants:
    """``c`` with another matmul_efficiency (the one fitted constant)."""
    return replace(c, matmul_efficiency=value)
