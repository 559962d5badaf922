"""One GPU, one prepared run (under 15 minutes): a bf16 fine-tune of a ~1B-parameter Llama
through stagewise (pp=1, and pp=2 with two ranks sharing the GPU) against plain transformers
on the same GPU: tokens/s, MFU, and peak memory against the planner's.

    python benchmarks/gpu_check.py --out gpu_check.json          # on a machine with a GPU
    python benchmarks/gpu_check.py --preset tiny --device cpu    # the same steps, here, tiny

What it runs, in order (``--preset 1b``: TinyLlama-1.1B's shape, width 2048, 22 blocks, 32
heads, 4 key/value heads, MLP 5632, 32,000-entry untied vocabulary; random weights, seed 0):

1. the model folder (``save_pretrained``) and a BPE tokenizer trained on the bundled text,
   made once under ``--work`` by ``finetune_speed.make_folder``;
2. ``stagewise train --model FOLDER --data FILE --dtype bf16 --device cuda -p 1`` and then
   ``-p 2`` (two local ranks on one GPU: NCCL refuses two ranks on one device, so these two
   use gloo and stage their transfers through host memory: what the pp=2 figure measures is
   the schedule and the runtime, not NCCL), 1F1B, global batch G of S tokens as m
   micro-batches, N steps (the first left out of tokens/s);
3. plain transformers in this process: ``from_pretrained`` in fp32 (the master weights, as
   stagewise keeps them), ``torch.autocast(bfloat16)`` (what ``--dtype bf16`` does), the same
   m micro-batches accumulated per step, ``torch.optim.AdamW``, sdpa attention;
4. MFU of each: tokens/s x the planner's FLOPs per token (``train.metrics.flops_per_token``)
   / the GPU's dense bf16 peak from the planner's catalog (one GPU, also for pp=2);
5. peak memory: each rank's ``torch.cuda.max_memory_allocated`` against ``stagewise plan
   --model-config FOLDER/config.json --gpu NAME`` for the same layout (pp ranks on pp GPUs),
   the planner's total less its fixed ``reserved`` allowance (CUDA context, allocator slack:
   ``max_memory_allocated`` does not see it). The planner counts bf16 weights and fp32
   gradients; autocast keeps fp32 weights, so about 2 bytes per parameter differ by design.

The two sides alternate ``--repeats`` times; medians and ratios are printed, and everything
(each repeat's figures, the GPU's name, the commands) is written to ``--out`` as JSON (under
``$OUT`` when that is set and ``--out`` is relative, for the device tool).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# finetune_speed is a sibling script, not a package.
from finetune_speed import Bench, make_folder, stagewise_exe, token_rows

PRESETS: dict[str, dict[str, int]] = {
    # TinyLlama-1.1B's shape: 1.10B parameters.
    "1b": {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4,
           "vocab": 32000, "global_batch": 16, "microbatches": 4, "seq_len": 1024},
    "tiny": {"hidden": 64, "intermediate": 160, "layers": 4, "heads": 4, "kv_heads": 2,
             "vocab": 2048, "global_batch": 4, "microbatches": 2, "seq_len": 32},
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_command(bench: Bench, pp: int, device: str) -> list[str]:
    """``stagewise train`` of the folder in bf16 on ``pp`` local ranks."""
    return [*stagewise_exe(), "train", "--model", str(bench.folder), "--data", str(bench.data),
            "-s", "1f1b", "-p", str(pp), "-m", str(bench.microbatches),
            "--global-batch", str(bench.global_batch), "--seq-len", str(bench.seq_len),
            "--steps", str(bench.steps), "--lr", str(bench.lr), "--dtype", "bf16",
            "--device", device, "--threads", str(bench.threads), "--timeout", "600",
            "--data-cache", str(bench.work / "cache"), "--json", "--no-plots"]


def run_stagewise(bench: Bench, pp: int, device: str) -> dict[str, Any]:
    """One run in a subprocess: tokens/s, step times, losses, each rank's peak memory."""
    command = train_command(bench, pp, device)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=bench.work)
    if done.returncode != 0:
        raise SystemExit(f"stagewise train -p {pp} failed ({done.returncode}):\n"
                         f"{done.stderr[-4000:]}")
    report = json.loads(done.stdout[done.stdout.index("{"):])
    return {"tokens_per_second": float(report["tokens_per_second"]),
            "step_seconds": report["step_seconds"], "losses": report["losses"],
            "peak_memory_bytes": report["peak_memory_bytes"],
            "wall_seconds": time.perf_counter() - start, "command": " ".join(command)}


def run_transformers(bench: Bench, rows: torch.Tensor, device: str) -> dict[str, Any]:
    """Plain transformers: fp32 weights, bf16 autocast, m micro-batches accumulated, AdamW."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(0)
    model: Any = AutoModelForCausalLM.from_pretrained(bench.folder, dtype=torch.float32,
                                                      attn_implementation="sdpa")
    model = model.to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=bench.lr)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, losses = [], []
    for step in range(bench.steps):
        batch = rows[order[step * bench.global_batch:(step + 1) * bench.global_batch]]
        batch = batch.to(device)
        _sync(device)
        start = time.perf_counter()
        total = 0.0
        for micro in batch.chunk(bench.microbatches):
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=micro, labels=micro).loss / bench.microbatches
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        seconds.append(time.perf_counter() - start)
        losses.append(total)
    peak = int(torch.cuda.max_memory_allocated()) if device == "cuda" else None
    del model, optimizer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    tokens = bench.global_batch * bench.seq_len
    return {"tokens_per_second": tokens / statistics.median(seconds[1:]),
            "step_seconds": seconds, "losses": losses, "peak_memory_bytes": [peak]}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def planned_memory(bench: Bench, pp: int, gpu: str | None) -> dict[str, Any] | None:
    """The planner's memory per GPU for the run's layout: total, and total less ``reserved``."""
    if gpu is None:
        return None
    command = [*stagewise_exe(), "plan", "--model-config", str(bench.folder / "config.json"),
               "--gpu", gpu, "--gpus", str(pp), "--tp", "1", "--pp", str(pp), "--dp", "1",
               "--seq-len", str(bench.seq_len), "--global-batch", str(bench.global_batch),
               "--micro-batch-size", str(bench.global_batch // bench.microbatches),
               "--recompute", "none", "--schedule", "1f1b", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-500:], "command": " ".join(command)}
    plan = json.loads(done.stdout)["plans"][0]
    memory = plan["memory_gib"]
    return {"total_gib": memory["total"], "reserved_gib": memory["reserved"],
            "allocated_gib": memory["total"] - memory["reserved"], "breakdown_gib": memory,
            "memory_rank": plan.get("memory_rank"), "command": " ".join(command)}


def _mfu(tokens_per_second: float, flops: float | None, peak: float | None) -> float | None:
    return None if flops is None or peak is None else tokens_per_second * flops / peak


def measure(bench: Bench, device: str, repeats: int, plan_gpu: str | None) -> dict[str, Any]:
    """Each side ``repeats`` times, alternating; medians, ratios, MFU and planned memory."""
    from stagewise.train.metrics import flops_per_token, gpu_catalog_name, gpu_peak_flops

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    gpu, peak = plan_gpu or gpu_catalog_name(name), gpu_peak_flops(name)
    config = json.loads((bench.folder / "config.json").read_text())
    flops = flops_per_token(config, bench.seq_len)
    rows = token_rows(bench)
    sides: dict[str, list[dict[str, Any]]] = {"stagewise pp=1": [], "stagewise pp=2": [],
                                             "transformers": []}
    for repeat in range(repeats):
        for side, runs in sides.items():
            _log(f"repeat {repeat + 1}/{repeats}: {side}")
            if side == "transformers":
                runs.append(run_transformers(bench, rows, device))
            else:
                runs.append(run_stagewise(bench, int(side[-1]), device))
            _log(f"  {runs[-1]['tokens_per_second']:,.0f} tokens/s")
    summary: dict[str, Any] = {}
    for side, runs in sides.items():
        tps = statistics.median(r["tokens_per_second"] for r in runs)
        peaks = [max(r["peak_memory_bytes"][k] or 0 for r in runs)
                 for k in range(len(runs[0]["peak_memory_bytes"]))]
        summary[side] = {"tokens_per_second": tps, "mfu": _mfu(tps, flops, peak),
                         "peak_memory_gib": [b / (1 << 30) for b in peaks], "runs": runs}
    theirs = summary["transformers"]["tokens_per_second"]
    for pp in (1, 2):
        side = summary[f"stagewise pp={pp}"]
        side["ratio_to_transformers"] = side["tokens_per_second"] / theirs
        side["planned_memory"] = planned_memory(bench, pp, gpu)
    return {"device_name": name, "catalog_gpu": gpu, "peak_flops": peak,
            "flops_per_token": flops, "sides": summary}


def _print(result: dict[str, Any], params: int, bench: Bench) -> None:
    print(f"device: {result['device_name']} (catalog {result['catalog_gpu']}); model "
          f"{params:,} parameters; bf16 autocast, fp32 master weights; global batch "
          f"{bench.global_batch} x {bench.seq_len} tokens as {bench.microbatches} "
          f"micro-batches, {bench.steps} steps (first left out)")
    print("\n| side | tokens/s (median) | vs transformers | MFU | peak GiB per rank | "
          "planner GiB (allocated / with reserve) |\n|---|---|---|---|---|---|")
    for side, figures in result["sides"].items():
        mfu = "n/a" if figures["mfu"] is None else f"{figures['mfu']:.1%}"
        ratio = figures.get("ratio_to_transformers")
        planned = figures.get("planned_memory")
        plan_text = "-"
        if planned and "allocated_gib" in planned:
            plan_text = f"{planned['allocated_gib']:.2f} / {planned['total_gib']:.2f}"
        elif planned:
            plan_text = "planner failed: " + planned["error"].splitlines()[-1]
        peaks = ", ".join(f"{g:.2f}" for g in figures["peak_memory_gib"])
        print(f"| {side} | {figures['tokens_per_second']:,.0f} | "
              f"{'-' if ratio is None else format(ratio, '.2f')} | {mfu} | {peaks} | "
              f"{plan_text} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--work", type=Path, default=Path("/tmp/stagewise-gpu-check"))
    parser.add_argument("--steps", type=int, default=8, help="steps per run (first left out)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4, help="torch threads per rank")
    parser.add_argument("--text-repeats", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--plan-gpu", help="the planner's GPU for the memory figures "
                        "(default: the catalog name of the CUDA device)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --device cpu (and --preset tiny) to try "
                         "the steps on a CPU")
    preset = PRESETS[args.preset]
    bench = Bench(work=args.work.resolve(), steps=args.steps, repeats=args.repeats,
                  threads=args.threads, lr=1e-5, text_repeats=args.text_repeats, **preset)
    bench.work.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    params = make_folder(bench)
    _log(f"{params:,} parameters in {bench.folder}")
    result = measure(bench, args.device, args.repeats, args.plan_gpu)
    result.update(parameters=params, preset=args.preset, seconds=time.perf_counter() - started)
    out = args.out
    if not out.is_absolute() and os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / out
    with contextlib.suppress(OSError):
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    _print(result, params, bench)
    print(f"\nall figures: {out} ({result['seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
