"""LoRA memory per rank: what ``stagewise train --lora`` holds, against the planner's model.

    .venv/bin/python benchmarks/lora_memory.py            # about a minute on 2 cores
    .venv/bin/python benchmarks/lora_memory.py --json

A Llama-shaped folder (random weights, made once under ``--work`` by
``finetune_speed.make_folder``) is fine-tuned with LoRA in bf16 on ``-p`` local ranks (CPU,
gloo); the run's ``--json`` report gives each rank's model states counted on its tensors
(``state_bytes``: frozen base and adapters, gradients, AdamW state) and the peak bytes its
pipeline saved for backward (``measured_activation_bytes``, counted by the runtime on every
saved tensor). ``stagewise plan --lora R`` is asked for the same model, layout, micro-batch
and schedule; it reports the rank at its memory peak, and that rank's components are compared:

- weights: the frozen base (bf16) and the adapters;
- gradients + optimizer: the adapters' gradients and AdamW state;
- activations: the planner's activations + logits against the saved bytes.

The planner's LoRA puts adapters on every projection (Q, K, V, O and the MLP's), so the run
targets the same seven modules. Figures are bytes of tensors, not the process's RSS: exact
here, and what a GPU's allocator would hold before its own slack (the planner's ``reserved``
allowance, left out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_speed import Bench, make_folder, stagewise_exe  # a sibling script, not a package

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
GIB = float(1 << 30)


def _run(command: list[str], cwd: Path | None = None) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed ({done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout[done.stdout.index("{"):])
    return result


def measured(bench: Bench, pp: int, rank: int) -> dict[str, Any]:
    """The LoRA run's report: each rank's state bytes and saved activation bytes."""
    command = [*stagewise_exe(), "train", "--model", str(bench.folder), "--data", str(bench.data),
               "-s", "1f1b", "-p", str(pp), "-m", str(bench.microbatches),
               "--global-batch", str(bench.global_batch), "--seq-len", str(bench.seq_len),
               "--steps", str(bench.steps), "--lr", "1e-3", "--dtype", "bf16",
               "--lora", f"r={rank},alpha={2 * rank},targets={TARGETS}",
               "--threads", "1", "--data-cache", str(bench.work / "cache"), "--json",
               "--no-plots"]
    report = _run(command, cwd=bench.work)
    return {"state_bytes": report["state_bytes"],
            "activation_bytes": report["measured_activation_bytes"],
            "command": " ".join(command)}


def planned(bench: Bench, pp: int, rank: int) -> dict[str, Any]:
    """The planner's memory of the same run (its peak rank)."""
    command = [*stagewise_exe(), "plan", "--model-config", str(bench.folder / "config.json"),
               "--gpu", "H100", "--gpus", str(pp), "--tp", "1", "--pp", str(pp), "--dp", "1",
               "--seq-len", str(bench.seq_len), "--global-batch", str(bench.global_batch),
               "--micro-batch-size", str(bench.global_batch // bench.microbatches),
               "--recompute", "none", "--schedule", "1f1b", "--attention", "flash",
               "--lora", str(rank), "--json"]
    plan = _run(command)["plans"][0]
    return {"memory_gib": plan["memory_gib"], "rank": plan["memory_rank"],
            "command": " ".join(command)}


def compare(run: dict[str, Any], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Component by component on the planner's peak rank: measured, planned, error."""
    rank = plan["rank"]
    states, memory = run["state_bytes"][rank], plan["memory_gib"]
    rows = [
        ("weights (frozen bf16 + adapters)", states["weights"], memory["weights"] * GIB),
        ("gradients + optimizer", states["gradients"] + states["optimizer"],
         (memory["gradients"] + memory["optimizer"]) * GIB),
        ("activations (+ logits)", run["activation_bytes"][rank],
         (memory["activations"] + memory["logits"]) * GIB),
    ]
    total_measured = sum(r[1] for r in rows)
    total_planned = sum(r[2] for r in rows)
    rows.append(("total (no reserve, no comm buffers)", total_measured, total_planned))
    return [{"component": name, "measured_bytes": m, "planned_bytes": p,
             "error": (p - m) / m if m else None} for name, m, p in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/stagewise-lora-memory"))
    parser.add_argument("-p", "--pp", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("-m", "--microbatches", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    bench = Bench(work=args.work.resolve(), hidden=args.hidden, intermediate=args.intermediate,
                  layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                  vocab=args.vocab, global_batch=args.global_batch,
                  microbatches=args.microbatches, seq_len=args.seq_len, steps=3, repeats=1,
                  threads=1, lr=1e-3, text_repeats=200)
    bench.work.mkdir(parents=True, exist_ok=True)
    params = make_folder(bench)
    run, plan = measured(bench, args.pp, args.lora_rank), planned(bench, args.pp, args.lora_rank)
    rows = compare(run, plan)
    if args.json:
        print(json.dumps({"parameters": params, "run": run, "plan": plan, "rows": rows},
                         indent=1))
        return
    print(f"{params:,} parameters, LoRA r={args.lora_rank} on {TARGETS}, bf16, pp={args.pp}, "
          f"1F1B, micro-batch {args.global_batch // args.microbatches} x {args.seq_len} "
          f"tokens; the planner's peak rank: {plan['rank']}")
    print("\n| component | measured MiB | planner MiB | planner error |\n|---|---|---|---|")
    for row in rows:
        error = "-" if row["error"] is None else f"{row['error']:+.1%}"
        print(f"| {row['component']} | {row['measured_bytes'] / 2**20:.2f} | "
              f"{row['planned_bytes'] / 2**20:.2f} | {error} |")


if __name__ == "__main__":
    main()
