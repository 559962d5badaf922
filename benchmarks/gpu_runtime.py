"""The runtime on CUDA tensors: gradients equal one process, and step times, on one GPU.

Run by hand on a CUDA machine:  python benchmarks/gpu_runtime.py [--out result.json]

Two local ranks share GPU 0 (one GPU cannot hold two NCCL ranks, so the group is gloo and the
runtime stages activations and gradients through host memory, as it does for any non-gloo
device on a gloo group). Each rank builds the same GPT, keeps its stages on cuda:0, trains
three steps through the schedule and compares its loss and every gradient with a deep copy of
the whole model trained in one process on the same GPU (fp32, TF32 off). Then it times steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from typing import Any

import torch

import stagewise
from stagewise.runtime import RankContext
from stagewise.runtime.models.tiny_gpt import GPTConfig, gpt_layers, lm_loss, make_batch

CONFIG = GPTConfig(vocab=256, seq_len=128, dim=512, heads=8, layers=8)
BATCH = 16


def rank_job(context: RankContext, name: str, microbatches: int) -> dict[str, Any]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(os.environ.get("STAGEWISE_DEVICE", "cuda:0"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    schedule = stagewise.build(name, num_ranks=context.world_size,
                               num_microbatches=microbatches)
    layers = gpt_layers(CONFIG, seed=1)
    reference = torch.nn.Sequential(*copy.deepcopy(layers)).to(device)
    stages = stagewise.partition(layers, schedule.num_stages)
    offsets = [sum(len(s) for s in stages[:k]) for k in range(len(stages) + 1)]
    mine = {k: m.to(device) for k, m in
            stagewise.stages_for_rank(schedule, stages, context.rank).items()}
    pipe = stagewise.Pipeline(schedule, mine, lm_loss, store=context.store, timeout=120)
    data = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(3):
        inputs, targets = make_batch(CONFIG, BATCH, data)
        loss = pipe.step(inputs.to(device), targets.to(device))
        ref_loss = lm_loss(reference(inputs.to(device)), targets.to(device))
        ref_loss.backward()
        if loss is not None:
            torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-4, atol=1e-5)
        for stage, module in mine.items():
            ref_part = reference[offsets[stage]:offsets[stage + 1]]
            for p, q in zip(module.parameters(), ref_part.parameters(), strict=True):
                assert p.grad is not None
                assert q.grad is not None
                assert p.grad.device == device
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
                worst = max(worst, float((p.grad - q.grad).abs().max()))
                p.grad = None
        reference.zero_grad()
    times = []
    inputs, targets = make_batch(CONFIG, BATCH, data)
    inputs, targets = inputs.to(device), targets.to(device)
    for _ in range(8):
        sync()
        start = time.perf_counter()
        pipe.step(inputs, targets)
        sync()
        times.append(time.perf_counter() - start)
        for module in mine.values():
            module.zero_grad()
    single = []
    if context.rank == 0:
        for _ in range(8):
            sync()
            start = time.perf_counter()
            lm_loss(reference(inputs), targets).backward()
            sync()
            single.append(time.perf_counter() - start)
    return {"rank": context.rank, "max_abs_grad_diff": worst,
            "step_s": statistics.median(times[2:]),
            "single_process_step_s": statistics.median(single[2:]) if single else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--schedules", default="1f1b,gpipe,interleaved-1f1b,zb-h1,zb-v")
    parser.add_argument("-m", "--microbatches", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    results = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
               "config": CONFIG.__dict__, "runs": []}
    for name in args.schedules.split(","):
        try:
            ranks = stagewise.launch(rank_job, 2, (name, args.microbatches), timeout=300)
            row = {"schedule": name, "equal": True, "ranks": ranks}
            print(f"{name}: gradients equal single-process on CUDA (max |diff| "
                  f"{max(r['max_abs_grad_diff'] for r in ranks):.2e}); pipeline step "
                  f"{max(r['step_s'] for r in ranks) * 1e3:.1f} ms, one process "
                  f"{ranks[0]['single_process_step_s'] * 1e3:.1f} ms", flush=True)
        except Exception as err:  # report and go on with the next schedule
            row = {"schedule": name, "equal": False, "error": str(err)[:2000]}
            print(f"{name}: FAILED {str(err)[:500]}", flush=True)
        results["runs"].append(row)
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
