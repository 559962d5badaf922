"""Mixed precision for pipeline stages: bf16 compute and transfers over fp32 weights.

:func:`autocast_stage` makes a stage run its forward under ``torch.autocast`` (matrix
multiplies and most activations in bf16; the precision-sensitive ops autocast keeps in fp32)
and hand its output to the next stage in bf16, so every activation and every activation
gradient that crosses ranks is half the bytes of fp32. The parameters stay fp32: they are
the master weights the optimizer updates (AdamW's state is fp32 too), so checkpoints, tied
weights, tensor and FSDP sharding and the dp gradient average see the same fp32 parameters
as an fp32 run. This is autocast, not bf16 parameters with a separate fp32 master copy:
the weights cost fp32 memory (4 bytes a parameter, the copy Megatron keeps beside its bf16
weights, without the bf16 one), and nothing in checkpoints or sharding changes.

The hooks keep parameter names (no wrapper module), so checkpoints keyed by layer and ties
named inside a stage are the same as without mixed precision. A recomputed stage recomputes
under the same autocast (``torch.utils.checkpoint`` restores the autocast state).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from stagewise.errors import ConfigError

__all__ = ["DTYPES", "autocast_stage", "float_loss", "torch_dtype"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``--dtype name``.

    Raises:
        ConfigError: a dtype other than fp32 and bf16.
    """
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} is not supported: choose one of "
                          f"{', '.join(DTYPES)}")
    return DTYPES[name]


def autocast_stage(stage: nn.Module, dtype: torch.dtype, device_type: str) -> None:
    """Run ``stage``'s forward under autocast to ``dtype`` and cast its floating output to
    ``dtype`` (what crosses to the next rank), in place (forward hooks).

    Example:
        >>> stage = nn.Linear(4, 4)
        >>> autocast_stage(stage, torch.bfloat16, "cpu")
        >>> stage(torch.ones(2, 4)).dtype, stage.weight.dtype
        (torch.bfloat16, torch.float32)
    """
    contexts: list[Any] = []

    def enter(module: nn.Module, args: Any) -> None:
        context = torch.autocast(device_type=device_type, dtype=dtype)
        context.__enter__()
        contexts.append(context)

    def leave(module: nn.Module, args: Any, output: Any) -> Any:
        contexts.pop().__exit__(None, None, None)
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return output.to(dtype)
        return output

    stage.register_forward_pre_hook(enter)
    stage.register_forward_hook(leave)


def float_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
               ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss_fn`` on the output upcast to fp32 (a bf16 softmax over a vocabulary loses
    digits the loss needs)."""

    def loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(output.float(), targets)

    return loss
