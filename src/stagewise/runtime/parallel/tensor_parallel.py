"""Tensor parallelism inside a pipeline stage: shard each transformer block over the tp ranks.

Model-agnostic: a model family says how its blocks shard by a :data:`TensorParallelPlan`, a
function that looks at a module and returns a :class:`BlockPlan` (this module is a block; shard
these submodules so) or None (not a block: look inside it). The families' plans live beside the
models (``stagewise.runtime.models``: the tiny GPT's ``Block``, Llama-style decoder layers).
:func:`apply_tensor_parallel` walks a stage and shards, in place, every block the plan
recognises with torch's tensor-parallel API (``parallelize_module``). The styles:

- ``"colwise"``: column-parallel (q/k/v projections, so each rank computes whole heads of its
  own; the first MLP matmul(s));
- ``"rowwise"``: row-parallel (attention output projection, last MLP matmul: one all-reduce);
- ``"shared"``: a norm feeding several column-parallel matmuls hands them one replicated
  ``DTensor``, so backward sums their partial input gradients and all-reduces once per group,
  not once per matmul: per block 2 all-reduces forward and 2 backward.

So a block takes and returns ordinary replicated tensors: the pipeline sends plain tensors
between stages, and embeddings, norms and the head stay replicated (their gradients agree over
the tp ranks because the input gradients are all-reduced). The sharded weights become
``DTensor`` parameters (their ``.grad`` too); an optimizer works on them as it is. A module
with a ``self_attn`` that the plan does not recognise is refused rather than left whole (it
would run unsharded on every tp rank); a plan refuses its own unsupported blocks (GPT-2's fused
attention) by raising :class:`~stagewise.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from stagewise.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.tensor.parallel import ParallelStyle

__all__ = ["STYLES", "BlockPlan", "TensorParallelPlan", "apply_tensor_parallel",
           "check_tensor_parallel"]

STYLES = ("colwise", "rowwise", "shared")


@dataclass(frozen=True)
class BlockPlan:
    """How one block shards over tp ranks.

    Attributes:
        styles: submodule name (``"self_attn.q_proj"``) -> ``"colwise"``, ``"rowwise"`` or
            ``"shared"`` (see the module docstring).
        divisible: ``(what, count, setting)`` for each count the tp size must divide
            (``("attention heads", 32, "num_attention_heads")``); the error names ``setting``.
    """

    styles: Mapping[str, str]
    divisible: tuple[tuple[str, int, str], ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.styles.values()) - set(STYLES))
        if unknown:
            raise ConfigError(f"tensor-parallel style {unknown[0]!r}: choose one of {STYLES}")


TensorParallelPlan = Callable[[nn.Module], BlockPlan | None]
"""A model family's plan: a module -> its :class:`BlockPlan`, or None when it is not a block."""


def apply_tensor_parallel(module: nn.Module, tp_mesh: object, plan: TensorParallelPlan) -> int:
    """Shard every block ``plan`` recognises inside ``module`` over ``tp_mesh``, in place.

    Args:
        module: a pipeline stage (layers in an ``nn.Sequential``, or any module holding them).
        tp_mesh: the 1-D tensor-parallel ``DeviceMesh`` (``MeshGroups.tp_mesh``). A mesh of
            size 1 leaves ``module`` as it is.
        plan: the model family's plan (``ModelParts.tp_plan``).

    Returns:
        How many blocks were sharded (0 for a size-1 mesh or a stage of embeddings/heads only).

    Raises:
        ConfigError: a count the plan names does not divide by the tp size, the stage holds a
            block the plan refuses or does not recognise, or a block is already sharded.

    Example (on each rank, after ``groups = build_mesh(Mesh(pp=2, tp=2))``)::

        for stage in mine.values():
            apply_tensor_parallel(stage, groups.tp_mesh, parts.tp_plan)
    """
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(tp_mesh, DeviceMesh) or tp_mesh.ndim != 1:
        raise ConfigError(
            f"tensor parallelism needs a 1-D DeviceMesh (MeshGroups.tp_mesh), got {tp_mesh!r}"
        )
    size = tp_mesh.size()
    if size == 1:
        return 0
    from torch.distributed.tensor.parallel import parallelize_module

    # Check every block before sharding any, so an error leaves the stage untouched.
    plans = [(block, _styles(block, found, size)) for block, found in _blocks(module, plan)]
    for block, styles in plans:
        parallelize_module(block, tp_mesh, styles)
    return len(plans)


def check_tensor_parallel(module: nn.Module, tp: int, plan: TensorParallelPlan) -> int:
    """Check, without a mesh, that ``module``'s blocks can be sharded over ``tp`` ranks.

    For validating a configuration before starting any process: the same checks
    :func:`apply_tensor_parallel` makes.

    Returns:
        How many blocks would be sharded (0 when ``tp`` is 1).

    Raises:
        ConfigError: as :func:`apply_tensor_parallel`.

    Example:
        >>> from stagewise.runtime.models.tiny_gpt import GPTConfig, gpt_layers, tp_plan
        >>> layers = gpt_layers(GPTConfig(heads=4, layers=2))
        >>> check_tensor_parallel(nn.Sequential(*layers), 2, tp_plan)
        2
    """
    if tp < 1:
        raise ConfigError(f"tp={tp}: the tensor-parallel size must be >= 1")
    if tp == 1:
        return 0
    found = list(_blocks(module, plan))
    for block, block_plan in found:
        _check(block, block_plan, tp)
    return len(found)


def _blocks(module: nn.Module, plan: TensorParallelPlan) -> Iterator[tuple[nn.Module, BlockPlan]]:
    """Every block ``plan`` recognises inside ``module`` (not descending into one).

    Refuses a module with attention that the plan does not recognise (a mixture-of-experts
    MLP, ``nn.TransformerEncoderLayer``): left whole, it would run unsharded on every tp rank.
    """
    found = plan(module)
    if found is not None:
        yield module, found
        return
    if isinstance(getattr(module, "self_attn", None), nn.Module):
        raise ConfigError(
            f"tensor parallelism is not supported for {type(module).__name__} blocks (this "
            "model's plan shards only the blocks it knows, e.g. q/k/v/o_proj attention with "
            "gate/up/down_proj MLPs): use tp=1 for this model"
        )
    for child in module.children():
        yield from _blocks(child, plan)


def _check(block: nn.Module, plan: BlockPlan, size: int) -> None:
    for what, count, setting in plan.divisible:
        if count % size:
            raise ConfigError(
                f"tp={size} does not divide the {count} {what}: use a tp that divides {count} "
                f"or change {setting} to a multiple of {size}"
            )
    for name in plan.styles:
        try:
            block.get_submodule(name)
        except AttributeError:
            raise ConfigError(
                f"the tensor-parallel plan names {name!r} but {type(block).__name__} has no "
                "such submodule"
            ) from None


def _styles(block: nn.Module, plan: BlockPlan, size: int) -> dict[str, ParallelStyle]:
    """The ``parallelize_module`` plan of one block, after checking its sizes divide."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleOutput,
        RowwiseParallel,
    )

    if any(isinstance(p, DTensor) for p in block.parameters()):
        raise ConfigError(
            f"a {type(block).__name__} is already sharded: call apply_tensor_parallel once "
            "per stage"
        )
    _check(block, plan, size)
    made: dict[str, ParallelStyle] = {
        "colwise": ColwiseParallel(),
        "rowwise": RowwiseParallel(),
        "shared": PrepareModuleOutput(output_layouts=Replicate(),
                                      desired_output_layouts=Replicate(),
                                      use_local_output=False),
    }
    return {name: made[style] for name, style in plan.styles.items()}
