"""Fit the fused-attention kernel's per-query-block overheads to published rates by length.

``kernels.flash_block_share`` gives the share of its long-sequence rate a fused attention
kernel reaches at sequence length s: each query block of 128 rows loops over its key blocks
and costs a fixed number of key blocks on top (n / (n + overhead) without a mask). This script
fits that overhead, forward and backward, with each curve's own long-sequence rate, to the
non-causal FlashAttention-2 curves of ``data/attention_rates.json`` by least squares on log
rate, and prints the fit's error per curve and the check row of PR #1791 (causal at 8k).
Run: ``.venv/bin/python benchmarks/attention_fit.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from stagewise.plan import DEFAULT_CONSTANTS
from stagewise.plan.kernels import flash_block_share

DATA = Path(__file__).resolve().parent / "data" / "attention_rates.json"
BLOCK = DEFAULT_CONSTANTS.gemm_tile


def fit_curve(rows: list[list[float]], overhead: float) -> tuple[float, float]:
    """(long-sequence rate, squared log error) of one curve at a given overhead: the rate
    is the geometric mean of rate / share over the rows (the least-squares optimum)."""
    shares = [flash_block_share(int(s), overhead, BLOCK, causal=False) for s, _ in rows]
    logs = [math.log(r / sh) for (_, r), sh in zip(rows, shares, strict=True)]
    top = math.exp(sum(logs) / len(logs))
    return top, sum((math.log(top * sh / r)) ** 2 for (_, r), sh in zip(rows, shares,
                                                                           strict=True))


def fit(curves: list[dict]) -> float:
    """The overhead (key blocks, 0.05 steps) minimising the summed squared log error."""
    grid = [i * 0.05 for i in range(1, 101)]
    return min(grid, key=lambda o: sum(fit_curve(c["rows"], o)[1] for c in curves))


def main() -> None:
    curves = [c for c in json.loads(DATA.read_text())["curves"] if c["rows"]]
    shipped = {"forward": DEFAULT_CONSTANTS.flash_forward_block_overhead,
               "backward": DEFAULT_CONSTANTS.flash_backward_block_overhead}
    for which in ("forward", "backward"):
        chosen = [c for c in curves if c["pass"] == which and c["causal"] is False]
        overhead = fit(chosen)
        print(f"{which}: fitted overhead {overhead:.2f} key blocks "
              f"(shipped {shipped[which]:.2f}) on {len(chosen)} curve(s)")
        for c in chosen:
            top, _ = fit_curve(c["rows"], shipped[which])
            errs = [top * flash_block_share(int(s), shipped[which], BLOCK, causal=False) / r - 1
                    for s, r in c["rows"]]
            print(f"  {c['id']:32s} long-sequence {top:5.0f} TFLOP/s, worst error "
                  f"{max(errs, key=abs):+.1%}")
    # PR #1791 at 8k: causal over non-causal, forward 284.1 / 369.9, backward 287.1 / 290.6
    for which, measured in (("forward", 284.1 / 369.9), ("backward", 287.1 / 290.6)):
        o = shipped[which]
        model = (flash_block_share(8192, o, BLOCK) / flash_block_share(8192, o, BLOCK, False))
        print(f"check, causal / non-causal at 8k {which}: model {model:.3f}, "
              f"PR #1791 {measured:.3f}")


if __name__ == "__main__":
    main()
