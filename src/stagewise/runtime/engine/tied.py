"""Weights shared between stages (tied embeddings): one value, one summed gradient.

A tie names, per stage, the parameter that is the same weight (``{0: "0.tokens.weight",
5: "1.out.weight"}``: the input embedding of stage 0 and the output projection of stage 5).
Single-process training would hold one tensor used twice, whose gradient is the sum of both
uses. Here each stage holds its own copy; at construction every copy takes the value of the
copy on the lowest rank, and after each step every copy's gradient becomes the sum over all
copies, so they stay equal under any optimizer that treats them alike. Copies on one rank are
summed locally (the same Parameter object used by two stages counts once); copies on several
ranks exchange their sums point-to-point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from stagewise.errors import ConfigError
from stagewise.schedules.ir import Schedule

__all__ = ["Ties"]


@dataclass(frozen=True)
class _Tie:
    local: tuple[nn.Parameter, ...]  # this rank's copies, each object once
    ranks: tuple[int, ...]  # every rank holding a copy, sorted
    tag: int


class Ties:
    """The ties that concern one rank (see the module docstring).

    Args:
        ties: each a mapping ``stage -> parameter name`` inside that stage's module.
        stages: this rank's ``{stage: module}``.
        schedule: gives which rank holds each stage.
        rank: this rank.
        group: the gloo process group that carries the copies (host memory).
        first_tag: tags from here on are free for tie messages.

    Raises:
        ConfigError: a tie names fewer than two stages, a stage outside the schedule, a missing
            parameter, or copies of different shapes.
    """

    def __init__(
        self,
        ties: Sequence[Mapping[int, str]],
        stages: Mapping[int, nn.Module],
        schedule: Schedule,
        rank: int,
        group: dist.ProcessGroup | None,
        first_tag: int,
    ) -> None:
        self._group = group
        self._rank = rank
        self._ties: list[_Tie] = []
        for index, tie in enumerate(ties):
            if len(tie) < 2 or any(not 0 <= s < schedule.num_stages for s in tie):
                raise ConfigError(
                    f"tie {dict(tie)} must name at least two stages among 0.."
                    f"{schedule.num_stages - 1}, each with a parameter name"
                )
            local: list[nn.Parameter] = []
            for stage, name in sorted(tie.items()):
                if stage in stages:
                    param = _parameter(stages[stage], stage, name)
                    if all(param is not seen for seen in local):
                        local.append(param)
            shapes = {tuple(p.shape) for p in local}
            if len(shapes) > 1:
                raise ConfigError(f"tie {dict(tie)}: the copies have different shapes {shapes}")
            ranks = tuple(sorted({schedule.rank_of(s) for s in tie}))
            if local:
                self._ties.append(_Tie(tuple(local), ranks, first_tag + 2 * index))

    def sync_values(self) -> None:
        """Give every copy the value of the copy on the lowest rank."""
        for tie in self._ties:
            source = tie.local[0].detach().to("cpu").contiguous()  # gloo carries host tensors
            if tie.ranks[0] == self._rank:
                for peer in tie.ranks[1:]:
                    dist.send(source, group=self._group, group_dst=peer, tag=tie.tag)
            else:
                source = torch.empty_like(source)
                dist.recv(source, group=self._group, group_src=tie.ranks[0], tag=tie.tag)
            with torch.no_grad():
                for param in tie.local:
                    param.copy_(source.to(param.device))

    def reduce_grads(self) -> None:
        """Make every copy's gradient the sum of all copies' gradients (same order everywhere)."""
        for tie in self._ties:
            mine = torch.zeros_like(tie.local[0], device="cpu")  # gloo carries host tensors
            for param in tie.local:
                if param.grad is not None:
                    mine += param.grad.to("cpu")
            parts = {self._rank: mine}
            peers = [r for r in tie.ranks if r != self._rank]
            works = [
                dist.isend(mine, group=self._group, group_dst=peer, tag=tie.tag + 1)
                for peer in peers
            ]
            for peer in peers:
                parts[peer] = torch.empty_like(mine)
                dist.recv(parts[peer], group=self._group, group_src=peer, tag=tie.tag + 1)
            for work in works:
                if work is not None:
                    work.wait()
            total = parts[tie.ranks[0]].clone()
            for r in tie.ranks[1:]:
                total += parts[r]
            for param in tie.local:
                param.grad = total.to(param.device, copy=True)


def _parameter(module: nn.Module, stage: int, name: str) -> nn.Parameter:
    found = dict(module.named_parameters(remove_duplicate=False)).get(name)
    if found is None:
        names = ", ".join(n for n, _ in module.named_parameters())
        raise ConfigError(
            f"stage {stage} has no parameter {name!r} to tie: its parameters are {names}"
        )
    return found
