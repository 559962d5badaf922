"""What bf16 saves on a pipeline transfer: bytes and time of one activation, fp32 against bf16.

    .venv/bin/python benchmarks/transfer_dtype.py                  # gloo, two local ranks
    .venv/bin/python benchmarks/transfer_dtype.py --tokens 8192 --hidden 4096

Two local ranks (``stagewise.launch``, gloo on 127.0.0.1) send one activation of micro-batch
tokens x hidden back and forth (rank 0 -> 1 -> 0), ``--repeats`` times per dtype, the dtypes
interleaved; each one-way time is half a round trip. The bytes are the tensor's
(``numel x element_size``): what ``--dtype bf16`` hands the next rank instead of fp32. Medians
and the ratio are printed; the machine is shared, so read the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

import stagewise
from stagewise.runtime import RankContext

DTYPES = (torch.float32, torch.bfloat16)


def rank_job(context: RankContext, tokens: int, hidden: int, repeats: int) -> dict[str, Any]:
    """Ping-pong each dtype's activation; rank 0 returns its one-way seconds per dtype."""
    buffers = {d: torch.ones(tokens, hidden, dtype=d) for d in DTYPES}
    seconds: dict[str, list[float]] = {str(d): [] for d in DTYPES}
    for _ in range(repeats + 1):  # the first round warms the connection up
        for dtype, tensor in buffers.items():
            dist.barrier()
            start = time.perf_counter()
            if context.rank == 0:
                dist.send(tensor, dst=1)
                dist.recv(tensor, src=1)
            else:
                dist.recv(tensor, src=0)
                dist.send(tensor, dst=0)
            seconds[str(dtype)].append((time.perf_counter() - start) / 2)
    return {k: v[1:] for k, v in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="micro-batch x seq_len")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    results = stagewise.launch(rank_job, 2, (args.tokens, args.hidden, args.repeats))
    times = results[0]
    print(f"activation {args.tokens} x {args.hidden}, gloo, 2 local ranks, {args.repeats} "
          "repeats (one-way = half a round trip)\n")
    print("| dtype | bytes | one-way ms (median) | GB/s |\n|---|---|---|---|")
    medians = {}
    for dtype in DTYPES:
        size = args.tokens * args.hidden * torch.tensor([], dtype=dtype).element_size()
        median = statistics.median(times[str(dtype)])
        medians[dtype] = median
        print(f"| {str(dtype).removeprefix('torch.')} | {size:,} | {median * 1e3:.2f} | "
              f"{size / median / 1e9:.2f} |")
    ratio = medians[torch.bfloat16] / medians[torch.float32]
    print(f"\nbf16 / fp32: bytes 0.50, time {ratio:.2f}")


if __name__ == "__main__":
    main()
