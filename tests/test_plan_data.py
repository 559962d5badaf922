"""The published-runs data the planner is scored on, and the GPU-table fit, are consistent."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from stagewise.plan import DEFAULT_CONSTANTS, get_gpu
from stagewise.plan.kernels import gemm_time

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from planner_runs import load_cases, published_inputs  # noqa: E402

RUNS = json.loads((BENCHMARKS / "data" / "published_runs.json").read_text())["runs"]


@pytest.mark.parametrize("run", RUNS, ids=[r["id"] for r in RUNS])
def test_every_row_is_cited_and_its_derived_step_time_follows_from_its_numbers(
    run: dict[str, object],
) -> None:
    assert run["source"]
    assert run["flops_counted"]
    assert run["source_family"]
    gpus, tp, pp, cp = (int(str(run[k])) for k in ("num_gpus", "tp", "pp", "cp"))
    assert int(str(run["dp"])) * tp * pp * cp == gpus
    if "tokens_per_s_per_gpu" in run:
        tokens = int(str(run["global_batch"])) * int(str(run["seq_len"]))
        derived = tokens / (float(str(run["tokens_per_s_per_gpu"])) * gpus)
        # the per-GPU column is rounded to a token/s: up to 1 / tokens_per_s_per_gpu off
        rounding = max(1e-3, 1.0 / float(str(run["tokens_per_s_per_gpu"])))
        assert float(str(run["step_time_s"])) == pytest.approx(derived, rel=rounding)
    if run.get("scored", True):
        model, cluster, _, fixed = published_inputs(run)
        assert cluster.num_gpus == gpus
        assert fixed["tp"] == tp
        assert model.layers > 0
    else:
        assert run["not_scored_because"]


A100_RUNS = json.loads((BENCHMARKS / "data" / "a100_runs.json").read_text())["runs"]


@pytest.mark.parametrize("run", [r for r in A100_RUNS if r["step_time_s"]],
                         ids=[r["id"] for r in A100_RUNS if r["step_time_s"]])
def test_a100_step_times_follow_eq_3_of_narayanan_et_al(run: dict[str, Any]) -> None:
    # F = 96 B s l h^2 (1 + s/6h + V/16lh) per iteration (full recomputation counted);
    # step = F / (TFLOP/s per GPU x GPUs), to the published TFLOP/s' 3 digits.
    b, s, layers, h, v = (run[k] for k in ("global_batch", "seq_len", "layers", "hidden", "vocab"))
    flops = 96 * b * s * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h))
    step = flops / (run["tflops_per_gpu"] * 1e12 * run["num_gpus"])
    assert run["step_time_s"] == pytest.approx(step, rel=0.005)
    assert run["dp"] * run["tp"] * run["pp"] == run["num_gpus"]
    if not run.get("scored", True):
        assert run["not_scored_because"]


def test_reference_rows_are_predicted_but_not_scored() -> None:
    from planner_runs import reference_cases

    scored = {c.id for c in load_cases()}
    reference = reference_cases()
    assert {c.id for c in reference} == {"mtnlg-530b-2240", "mtnlg-530b-2800",
                                         "mtnlg-530b-3360"}
    assert not scored & {c.id for c in reference}


def test_every_source_has_runs_and_ids_are_unique() -> None:
    cases = load_cases()
    assert len({c.id for c in cases}) == len(cases)
    assert {c.source for c in cases} >= {"korthikanti22", "narayanan21-table1",
                                         "nvidia-nemo-fp8-h100", "meta-llama3",
                                         "mosaicml-llm-foundry-h100",
                                         "mosaicml-llm-foundry-a100"}


FOUNDRY = [r for r in RUNS if r["source_family"].startswith("mosaicml-llm-foundry-")]


@pytest.mark.parametrize("run", FOUNDRY, ids=[r["id"] for r in FOUNDRY])
def test_llm_foundry_rows_agree_with_their_own_columns(run: dict[str, Any]) -> None:
    # Two columns copied from each table row check each other: the total throughput is the
    # per-GPU one times the GPUs (the per-GPU figure is rounded down to a token), and the
    # batch in tokens is the batch in sequences times the sequence length.
    per_gpu = run["tokens_per_s"] / run["num_gpus"]
    assert run["tokens_per_s_per_gpu"] <= per_gpu < run["tokens_per_s_per_gpu"] + 1
    assert run["global_batch_tokens"] == run["global_batch"] * run["seq_len"]
    assert run["step_time_s"] == pytest.approx(run["global_batch_tokens"] / run["tokens_per_s"],
                                               abs=1e-4)


@pytest.mark.parametrize("run", FOUNDRY, ids=[r["id"] for r in FOUNDRY])
def test_llm_foundry_architectures_give_the_tables_parameter_count(run: dict[str, Any]) -> None:
    # The table's NumParams, by hand: per layer 12 d^2 weights and 13 d biases and norms
    # (qkv 3d, out d, fc1 4d, fc2 d, two LayerNorms 4d), a final LayerNorm 2d, the tied
    # embedding V d and the learned position table s d. The planner counts the same.
    a = run["architecture"]
    d, layers, vocab, seq = a["hidden"], a["layers"], a["vocab"], run["seq_len"]
    by_hand = layers * (12 * d * d + 13 * d) + 2 * d + vocab * d + seq * d
    assert by_hand == run["num_params"]
    model, _, _, _ = published_inputs(run)
    assert model.num_params == run["num_params"]


def test_fp8_is_fitted_against_its_own_sources_bf16_level() -> None:
    # A source whose every run (BF16 and FP8) is 20 % fast has FP8 exactly where its BF16
    # is: relative errors 0. A source with FP8 runs only keeps its own errors.
    from planner_accuracy import fp8_relative_errors

    class Fixed:
        def select(self, key: object, keep: set[str], fp8: bool | None = None) -> list[float]:
            (source,) = keep
            if source == "both":
                return [-0.2, -0.2] if fp8 else [-0.2, -0.1, -0.3]
            return [0.05] if fp8 else []

    relative = fp8_relative_errors(Fixed(), (0.8, 0.9), {"both", "fp8-only"})
    assert relative == pytest.approx([0.0, 0.0, 0.05])


def test_a_gpu_table_fit_recovers_the_efficiency_it_was_made_with(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from gpu_tables import fitted_efficiency

    gpu = get_gpu("h100")
    truth = replace(DEFAULT_CONSTANTS, matmul_efficiency=0.62, fp8_efficiency=0.7)
    shapes = [(8192, 8192, 8192), (4096, 28672, 8192), (4096, 8192, 3584)]
    rows = [{"m": m, "n": n, "k": k, "dtype": dtype,
             "seconds": gemm_time(m, n, k, gpu, truth, fp8=dtype == "fp8")}
            for m, n, k in shapes for dtype in ("bf16", "fp8")]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"catalog_gpu": gpu.name, "gemm": rows}))
    fitted = fitted_efficiency(path)
    assert fitted.matmul_efficiency == pytest.approx(0.62, rel=1e-6)
    assert fitted.fp8_efficiency == pytest.approx(0.7, rel=1e-6)


@pytest.mark.parametrize("matmul", [0.7, 0.82, 1.0])
def test_flash_attn_2_on_hopper_runs_at_its_published_share_of_the_peak(matmul: float) -> None:
    # FlashAttention-3's abstract: FlashAttention-2 reaches 35 % of the H100's peak. The
    # attention rate the planner then uses is 0.35 x 989.4 TFLOP/s whatever the fitted
    # matmul efficiency; on an A100 (no FP8 tensor cores, FlashAttention-2's own GPU) and for
    # rows naming no kernel nothing changes.
    from planner_runs import with_attention_kernel

    from stagewise.plan.kernels import gemm_rate

    c = replace(DEFAULT_CONSTANTS, matmul_efficiency=matmul)
    h100, a100 = get_gpu("H100-SXM5-80GB"), get_gpu("A100-SXM4-80GB")
    fa2 = with_attention_kernel(c, "flash-attn-2", h100)
    assert gemm_rate(h100, fa2) * fa2.flash_efficiency == pytest.approx(0.35 * 989.4e12)
    assert with_attention_kernel(c, "flash-attn-2", a100) == c
    assert with_attention_kernel(c, None, h100) == c
    # The Triton kernel of 2023: FlashAttention-2 is 1.3-1.5x faster forward and about 2x
    # backward (FlashAttention-2 paper, sec. 4.1): forward 0.35 / 1.4, backward 0.35 x 0.86 / 2.
    tri = with_attention_kernel(c, "triton-2023", h100)
    assert gemm_rate(h100, tri) * tri.flash_efficiency == pytest.approx(0.25 * 989.4e12)
    backward = gemm_rate(h100, tri) * tri.flash_efficiency * tri.flash_backward_share
    assert backward == pytest.approx(0.35 * 0.86 / 2 * 989.4e12)
    # On A100 the planner's own flash rate is FlashAttention-2's; Triton's is slower by the same.
    slow = with_attention_kernel(c, "triton-2023", a100)
    assert slow.flash_efficiency == pytest.approx(c.flash_efficiency / 1.4)
    assert slow.flash_efficiency * slow.flash_backward_share == pytest.approx(
        c.flash_efficiency * c.flash_backward_share / 2)


BLOOM = [r for r in RUNS if r["source_family"] == "bigscience-bloom" and r["step_time_s"]]


@pytest.mark.parametrize("run", BLOOM, ids=[r["id"] for r in BLOOM])
def test_bigscience_rows_agree_with_their_logged_tflops(run: dict[str, Any]) -> None:
    # The logs print Sec/it and Megatron-DeepSpeed's hardware TFLOP/s, 24 x 4 x B s l h^2
    # (1 + s/6h + V/16lh) / (t x GPUs) with the padded vocabulary: where the cited text has
    # both, they must agree with the row's sizes and step time.
    assert f"{run['step_time_s']:.2f}" in run["source"]
    arch = run["architecture"]
    layers, h, s, b = arch["layers"], arch["hidden"], run["seq_len"], run["global_batch"]
    assert run["dp"] * run["tp"] * run["pp"] == run["num_gpus"]
    logged = re.findall(r"TFLOPs: ([0-9.]+)", run["source"]) or re.findall(
        rf"\| {run['step_time_s']:.2f} \| ([0-9.]+) \|", run["source"])
    assert logged, run["id"]
    v = 250880
    flops = 96 * b * s * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h))
    tflops = flops / (run["step_time_s"] * run["num_gpus"] * 1e12)
    assert tflops == pytest.approx(float(logged[-1]), abs=0.011)
