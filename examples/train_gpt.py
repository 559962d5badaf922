"""Train a tiny GPT through a pipeline schedule: the per-rank API in one page.

    python examples/train_gpt.py                         # 2 local processes (gloo, CPU)
    python examples/train_gpt.py --schedule zb-h1 -m 8
    torchrun --nproc-per-node 2 examples/train_gpt.py    # the same script under torchrun

Every rank builds the same model, keeps only its stages, and calls ``pipe.step`` with the
whole batch; the rank holding the last stage gets the mean loss back.
"""

from __future__ import annotations

import argparse

import torch

import stagewise
from stagewise.runtime import RankContext, in_torchrun, torchrun_context
from stagewise.runtime.models.tiny_gpt import GPTConfig, gpt_layers, lm_loss, make_batch


def train(context: RankContext, schedule_name: str, microbatches: int, steps: int) -> None:
    schedule = stagewise.build(
        schedule_name, num_ranks=context.world_size, num_microbatches=microbatches
    )
    config = GPTConfig(layers=4)
    stages = stagewise.partition(gpt_layers(config), schedule.num_stages, method="params")
    mine = stagewise.stages_for_rank(schedule, stages, context.rank)
    pipe = stagewise.Pipeline(schedule, mine, loss_fn=lm_loss, store=context.store)
    optimizer = torch.optim.AdamW([p for m in mine.values() for p in m.parameters()], lr=3e-3)
    data = torch.Generator().manual_seed(0)  # the same batches on every rank
    for step in range(steps):
        inputs, targets = make_batch(config, 16, data)
        loss = pipe.step(inputs, targets)  # the mean loss on the last stage's rank, else None
        optimizer.step()
        optimizer.zero_grad()
        if loss is not None and step % 5 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("-m", "--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--ranks", type=int, default=2, help="local processes (not torchrun)")
    args = parser.parse_args()
    job = (args.schedule, args.microbatches, args.steps)
    if in_torchrun():
        context = torchrun_context()
        train(context, *job)
        torch.distributed.destroy_process_group()
    else:
        stagewise.launch(train, args.ranks, job)


if __name__ == "__main__":
    main()
