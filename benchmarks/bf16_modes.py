"""Two ways to train in bf16, measured side by side: autocast over fp32 weights (what
``--dtype bf16`` does) against bf16 weights with a separate fp32 master copy.

    .venv/bin/python benchmarks/bf16_modes.py                 # a few minutes on 2 cores
    .venv/bin/python benchmarks/bf16_modes.py --device cuda   # on a GPU

One process, a Llama-shaped stack of Hugging Face ``LlamaDecoderLayer`` blocks with an
embedding and a head (random weights, seed 0), micro-batches accumulated, AdamW. Modes:

- ``fp32``: everything fp32 (the reference);
- ``autocast``: fp32 weights, gradients and AdamW state; forward under
  ``torch.autocast(bfloat16)`` (GEMMs in bf16, weights cast on the fly);
- ``master``: bf16 weights and gradients in the model, an fp32 master copy of every weight
  beside them that AdamW (fp32 state) updates, the bf16 weights refreshed from the master after
  each step (Megatron's mixed precision without its fused kernels).

For each: median step time over ``--steps`` (first left out), the model states' bytes counted
on the tensors (weights, master copy, gradients, optimizer), the loss after the last step
against fp32's, and the peak saved-for-backward bytes of one micro-batch. Modes are
interleaved ``--repeats`` times; read the ratios.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

MODES = ("fp32", "autocast", "master")


class Model(nn.Module):
    """Embedding, Llama blocks, final norm, head."""

    def __init__(self, hidden: int, layers: int, vocab: int) -> None:
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRMSNorm,
            LlamaRotaryEmbedding,
        )

        config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                             num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                             num_hidden_layers=layers, vocab_size=vocab)
        config._attn_implementation = "sdpa"
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(layers))
        self.norm = LlamaRMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.rotary = LlamaRotaryEmbedding(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        position = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        rotary = self.rotary(x, position)
        for block in self.blocks:
            out = block(x, position_embeddings=rotary)
            x = out[0] if isinstance(out, tuple) else out
        return self.head(self.norm(x))


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Trainer:
    """One mode's model, optimizer and step."""

    def __init__(self, mode: str, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        self.mode, self.device, self.m = mode, args.device, args.microbatches
        self.model = Model(args.hidden, args.layers, args.vocab).to(args.device)
        self.master: list[torch.Tensor] = []
        params = list(self.model.parameters())
        if mode == "master":
            self.master = [p.detach().float().clone().requires_grad_(True) for p in params]
            self.model.to(torch.bfloat16)
            self.optimizer = torch.optim.AdamW(self.master, lr=args.lr)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=args.lr)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        context = (torch.autocast(self.device, dtype=torch.bfloat16) if self.mode == "autocast"
                   else torch.autocast(self.device, enabled=False))
        with context:
            logits = self.model(ids[:, :-1])
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    def step(self, batch: torch.Tensor) -> float:
        total = 0.0
        for micro in batch.chunk(self.m):
            loss = self.loss(micro) / self.m
            loss.backward()
            total += loss.item()
        if self.mode == "master":
            params = list(self.model.parameters())
            for master, param in zip(self.master, params, strict=True):
                master.grad = param.grad.float() if param.grad is not None else None
            self.optimizer.step()
            with torch.no_grad():
                for master, param in zip(self.master, params, strict=True):
                    param.copy_(master)
            self.model.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def state_bytes(self) -> dict[str, int]:
        params = list(self.model.parameters())
        state = [v for s in self.optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor)]
        # One gradient per weight, in the weight's dtype (bf16 in "master", then cast to fp32
        # one tensor at a time for the optimizer).
        return {"weights": _bytes(params), "master": _bytes(self.master),
                "gradients": _bytes(params), "optimizer": _bytes(state)}

    def saved_bytes(self, ids: torch.Tensor) -> int:
        """Bytes saved for backward by one micro-batch's forward (each storage once)."""
        seen: dict[tuple[int, torch.dtype], int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.device.type != "meta" and tensor.data_ptr():
                key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
                seen[key] = max(seen.get(key, 0), tensor.untyped_storage().nbytes())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss(ids)
        del loss
        return sum(seen.values())


def _timed(step: Callable[[], float], device: str) -> tuple[float, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("-m", "--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=generator)
               .to(args.device) for _ in range(args.steps)]
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    results: dict[str, dict[str, Any]] = {}
    micro = batches[0][: args.batch // args.microbatches]
    for _ in range(args.repeats):
        for mode in MODES:
            trainer = Trainer(mode, args)
            times, losses = [], []
            for batch in batches:
                elapsed, loss = _timed(functools.partial(trainer.step, batch), args.device)
                times.append(elapsed)
                losses.append(loss)
            seconds[mode].append(statistics.median(times[1:]))
            results[mode] = {"states": trainer.state_bytes(), "last_loss": losses[-1],
                             "saved": trainer.saved_bytes(micro)}
            del trainer
    base = statistics.median(seconds["fp32"])
    print(f"{args.layers} Llama blocks, hidden {args.hidden}, vocab {args.vocab}, batch "
          f"{args.batch} x {args.seq_len} as {args.microbatches} micro-batches, "
          f"{args.device}, {args.repeats} repeats x {args.steps} steps\n")
    print("| mode | step s (median) | vs fp32 | weights MiB | master MiB | grads MiB | "
          "AdamW MiB | states MiB | saved/micro-batch MiB | last loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in MODES:
        step = statistics.median(seconds[mode])
        states = results[mode]["states"]
        mib = {k: v / 2**20 for k, v in states.items()}
        print(f"| {mode} | {step:.3f} | {step / base:.2f} | {mib['weights']:.1f} | "
              f"{mib['master']:.1f} | {mib['gradients']:.1f} | {mib['optimizer']:.1f} | "
              f"{sum(mib.values()):.1f} | {results[mode]['saved'] / 2**20:.1f} | "
              f"{results[mode]['last_loss']:.4f} |")


if __name__ == "__main__":
    main()
