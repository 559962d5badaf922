"""Time one Llama-style transformer layer's forward and backward on a GPU, per TP slice.

Run by hand on a CUDA machine:  python benchmarks/gpu_layer.py --out layer_times.json

For tensor-parallel degree t, one GPU runs the layer's t-th slice (heads/t query heads,
max(kv_heads/t, 1) KV heads, ffn/t MLP width), which is the compute each GPU of a TP group does;
the TP collectives are not in this measurement. Defaults are Llama-2-70B's shapes (hidden 8192,
64 heads, 8 KV heads, ffn 28672) at sequence 4096, micro-batch 1, bf16. Times are medians over
CUDA-event-timed repeats after warm-up. Also prints the bf16 matmul rate the chip reaches, the
ceiling the planner's efficiency model is relative to. Compare with
`stagewise.plan.layer_time(...)` (benchmarks/compare_layer_times.py).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F  # noqa: N812 - the name torch's own docs use
from torch import nn


class Layer(nn.Module):
    """RMSNorm -> QKV -> causal attention (GQA) -> O -> RMSNorm -> SwiGLU MLP, residuals."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, ffn: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.norm1 = nn.RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, hidden, bias=False)
        self.norm2 = nn.RMSNorm(hidden)
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim,
             self.kv_heads * self.head_dim], dim=-1)
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              enable_gqa=self.kv_heads != self.heads)
        x = x + self.out(attn.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def layer_times(args: argparse.Namespace, tp: int) -> dict[str, float]:
    head_dim = args.hidden // args.heads
    layer = Layer(args.hidden, args.heads // tp, max(args.kv_heads // tp, 1), args.ffn // tp,
                  head_dim).cuda().to(torch.bfloat16)
    x = torch.randn(args.micro_batch, args.seq, args.hidden, device="cuda",
                    dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    def forward_backward() -> None:
        layer(x).backward(grad)

    for _ in range(3):
        forward_backward()
    torch.cuda.synchronize()
    fwd = timed(forward, args.repeats)
    both = timed(forward_backward, args.repeats)
    return {"tp": tp, "forward_s": fwd, "backward_s": both - fwd}


def matmul_rate(repeats: int) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    seconds = timed(lambda: a @ b, repeats)
    return 2 * 8192**3 / seconds / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=28672)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tp", default="1,2,4,8")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "matmul_tflops_bf16": matmul_rate(args.repeats),
        "shape": {k: getattr(args, k) for k in ("hidden", "heads", "kv_heads", "ffn", "seq",
                                               "micro_batch")},
        "layers": [layer_times(args, int(t)) for t in args.tp.split(",")],
    }
    print(f"{result['device']}: bf16 8192^3 matmul {result['matmul_tflops_bf16']:.0f} TFLOP/s")
    for row in result["layers"]:
        print(f"tp={row['tp']}: forward {row['forward_s'] * 1e3:.2f} ms, "
              f"backward {row['backward_s'] * 1e3:.2f} ms")
    if args.out:
        with open(args.out, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
