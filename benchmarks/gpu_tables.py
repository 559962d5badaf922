"""Measure GEMM and attention efficiency tables and one Llama layer on a GPU, as planner data.

One run (a few minutes on an H100, well under 15): times, with CUDA events after warm-up,

- GEMMs (m x k) @ (k x n) in bf16, and in FP8 where the GPU has it (``torch._scaled_mm``),
  over the shapes training meets: m = b·s tokens, n and k the hidden size, its TP slices and
  the MLP width;
- causal flash attention (``scaled_dot_product_attention``) forward and forward + backward;
- one Llama layer per TP slice (``gpu_layer.layer_times``);

and writes them to ``--out`` (JSON) with the GPU's CUDA name, its catalog name and, beside every
measurement, the planner's prediction for the same kernel (``stagewise.plan.kernels``). The
file is what ``fitted_efficiency`` reads: it returns the ``matmul_efficiency`` (and
``fp8_efficiency``) that minimise the median error of the planner's GEMM times on that GPU, to
use as ``Constants`` for plans on it.

Run on a GPU machine (from benchmarks/):
``python gpu_tables.py --out data/gpu_tables_h100.json``
Check the code path on a CPU (tiny shapes, perf_counter timing, no FP8):
``python gpu_tables.py --device cpu --quick``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the name torch's own docs use

from stagewise.plan import DEFAULT_CONSTANTS, Constants, GpuSpec, get_gpu
from stagewise.plan.kernels import gemm_time

HIDDEN = (2048, 4096, 8192, 16384)
TOKENS = (2048, 4096, 8192, 16384)
QUICK_HIDDEN, QUICK_TOKENS = (64, 128), (64, 128)


def timer(device: str, repeats: int) -> Callable[[Callable[[], Any]], float]:
    """A function timing ``fn`` (median seconds over ``repeats`` after 3 warm-up calls)."""
    def run(fn: Callable[[], Any]) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        return float(statistics.median(times))
    return run


def gemm_shapes(quick: bool) -> list[tuple[int, int, int]]:
    """(m, n, k): tokens x (hidden, hidden/t slices, 4 x hidden) x hidden, and the transposes."""
    shapes = set()
    for h in QUICK_HIDDEN if quick else HIDDEN:
        for m in QUICK_TOKENS if quick else TOKENS:
            for n in (h, h // 4, h // 8, 4 * h // 8, 4 * h):
                shapes.add((m, n, h))
                shapes.add((m, h, n))
    return sorted(shapes)


def fp8_gemm(m: int, n: int, k: int, device: str) -> Callable[[], Any] | None:
    """An FP8 (e4m3) GEMM closure, or None where torch or the GPU has no FP8 matmul."""
    if device != "cuda" or not hasattr(torch, "_scaled_mm"):
        return None
    if torch.cuda.get_device_capability() < (8, 9):
        return None
    a = torch.randn(m, k, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device=device).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=device)
    return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def gemm_table(args: argparse.Namespace, gpu: GpuSpec | None) -> list[dict[str, Any]]:
    """Measured (and predicted) seconds of every GEMM shape, bf16 and FP8."""
    measure = timer(args.device, args.repeats)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = []
    for m, n, k in gemm_shapes(args.quick):
        a = torch.randn(m, k, device=args.device, dtype=dtype)
        b = torch.randn(k, n, device=args.device, dtype=dtype)
        def plain(a: torch.Tensor = a, b: torch.Tensor = b) -> torch.Tensor:
            return a @ b

        label = "bf16" if args.device == "cuda" else "fp32"
        kernels: list[tuple[str, Callable[[], Any] | None]] = [
            (label, plain), ("fp8", fp8_gemm(m, n, k, args.device))]
        for name, fn in kernels:
            if fn is None:
                continue
            seconds = measure(fn)
            row: dict[str, Any] = {"m": m, "n": n, "k": k, "dtype": name, "seconds": seconds,
                                   "tflops": 2 * m * n * k / seconds / 1e12}
            if gpu is not None:
                row["predicted_s"] = gemm_time(m, n, k, gpu, DEFAULT_CONSTANTS,
                                               fp8=name == "fp8")
            rows.append(row)
    return rows


def attention_table(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Causal fused attention, forward and forward + backward, 128-wide heads."""
    measure = timer(args.device, args.repeats)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = []
    for seq in (128, 256) if args.quick else (2048, 4096, 8192):
        for heads in (2,) if args.quick else (8, 16, 32, 64):
            q, k, v = (torch.randn(1, heads, seq, 128, device=args.device, dtype=dtype,
                                   requires_grad=True) for _ in range(3))
            grad = torch.randn_like(q)

            def forward(q: Any = q, k: Any = k, v: Any = v) -> Any:
                with torch.no_grad():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            def both(q: Any = q, k: Any = k, v: Any = v, grad: Any = grad) -> None:
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

            fwd = measure(forward)
            total = measure(both)
            flops = 4.0 * seq * seq * 128 * heads * 0.5  # causal half of QK^T and PV
            rows.append({"seq": seq, "heads": heads, "head_dim": 128, "forward_s": fwd,
                         "backward_s": total - fwd, "forward_tflops": flops / fwd / 1e12,
                         "backward_tflops": 2.5 * flops / max(total - fwd, 1e-12) / 1e12})
    return rows


def fitted_efficiency(path: Path, base: Constants = DEFAULT_CONSTANTS) -> Constants:
    """``base`` with the matmul (and FP8) efficiency that best fits a measured GEMM table.

    Each compute-bound row's efficiency is solved for (bisection: a tile's fixed
    ``tile_overhead_s`` does not scale with the efficiency, so the time is not simply
    proportional to its inverse); the BF16 rows' median is the fitted ``matmul_efficiency``.
    Then each FP8 row's ``fp8_efficiency`` is solved for the same way; their median.
    """
    table = json.loads(path.read_text())
    gpu = get_gpu(table["catalog_gpu"])
    compute_bound = replace(base, kernel_overhead_s=0.0, hbm_efficiency=1e9)
    fitted: dict[str, list[float]] = {"bf16": [], "fp32": [], "fp8": []}
    rows = [(row, row["seconds"] - base.kernel_overhead_s) for row in table["gemm"]]
    for row, seconds in rows:
        if row["dtype"] != "fp8" and seconds > 0:
            def plain_model(efficiency: float, row: dict[str, Any] = row) -> float:
                return gemm_time(row["m"], row["n"], row["k"], gpu,
                                 replace(compute_bound, matmul_efficiency=efficiency))
            fitted[row["dtype"]].append(_solve_decreasing(plain_model, seconds))
    plain = fitted["bf16"] or fitted["fp32"]  # fp32: the CPU check of this script
    matmul = statistics.median(plain) if plain else base.matmul_efficiency
    for row, seconds in rows:
        if row["dtype"] == "fp8" and seconds > 0:
            def model(fp8_efficiency: float, row: dict[str, Any] = row) -> float:
                c = replace(compute_bound, matmul_efficiency=matmul,
                            fp8_efficiency=fp8_efficiency)
                return gemm_time(row["m"], row["n"], row["k"], gpu, c, fp8=True)
            fitted["fp8"].append(_solve_decreasing(model, seconds))
    fp8 = statistics.median(fitted["fp8"]) if fitted["fp8"] else base.fp8_efficiency
    return replace(base, matmul_efficiency=matmul, fp8_efficiency=fp8)


def _solve_decreasing(fn: Callable[[float], float], target: float) -> float:
    """x in [0.01, 100] with fn(x) = target for a decreasing fn (bisection on a log scale)."""
    low, high = 0.01, 100.0
    for _ in range(80):
        mid = (low * high) ** 0.5
        low, high = (mid, high) if fn(mid) > target else (low, mid)
    return (low * high) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny shapes (checks the code)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from stagewise.train.metrics import gpu_catalog_name

    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    catalog = gpu_catalog_name(name) if args.device == "cuda" else None
    gpu = get_gpu(catalog) if catalog else None
    result: dict[str, Any] = {
        "device": name, "catalog_gpu": catalog or "cpu", "torch": torch.__version__,
        "gemm": gemm_table(args, gpu), "attention": attention_table(args),
    }
    if args.device == "cuda" and not args.quick:
        from gpu_layer import layer_times

        shape = argparse.Namespace(hidden=8192, heads=64, kv_heads=8, ffn=28672, seq=4096,
                                   micro_batch=1, repeats=args.repeats)
        result["llama_layer"] = {"shape": "llama-2-70b, seq 4096, micro-batch 1",
                                 "rows": [layer_times(shape, t) for t in (1, 2, 4, 8)]}
    best = max(r["tflops"] for r in result["gemm"])
    print(f"{name}: {len(result['gemm'])} GEMMs (best {best:.1f} TFLOP/s), "
          f"{len(result['attention'])} attention shapes")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        if gpu is not None or args.device == "cpu":
            fitted = fitted_efficiency(Path(args.out))
            print(f"fitted matmul_efficiency {fitted.matmul_efficiency:.3f}, "
                  f"fp8_efficiency {fitted.fp8_efficiency:.3f}")


if __name__ == "__main__":
    main()
