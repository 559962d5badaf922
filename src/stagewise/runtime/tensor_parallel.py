"""Tensor parallelism inside a pipeline stage: shard each transformer block over the tp ranks.

:func:`apply_tensor_parallel` walks a stage (an ``nn.Sequential`` of layers) and shards, in
place, every block it recognises with torch's tensor-parallel API (``parallelize_module``):

- attention: q, k and v projections column-parallel (each rank computes whole heads of its own;
  the blocks reshape with ``-1`` heads, so they run on the local heads unchanged), the output
  projection row-parallel (one all-reduce of the output);
- MLP: the first matmul(s) column-parallel, the last row-parallel (one all-reduce).
- the norm before each group of column-parallel matmuls hands them one replicated ``DTensor``,
  so backward all-reduces their summed input gradient once per group, not once per matmul:
  per block 2 all-reduces forward and 2 backward.

So a block takes and returns ordinary replicated tensors: the pipeline sends plain tensors
between stages, and embeddings, norms and the head stay replicated (their gradients agree over
the tp ranks because the input gradients are all-reduced). The sharded weights become
``DTensor`` parameters (their ``.grad`` too); an optimizer works on them as it is.

Recognised blocks: the tiny GPT's ``Block`` and Hugging Face Llama decoder layers (also any
decoder layer with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``, the layout
Qwen2 and Mistral share; only Llama is tested). Any other block with a ``self_attn`` and
GPT-2's blocks (fused ``Conv1D`` attention, not shardable by head) are refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch import nn

from stagewise.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.tensor.parallel import ParallelStyle

__all__ = ["apply_tensor_parallel", "check_tensor_parallel"]


def apply_tensor_parallel(module: nn.Module, tp_mesh: object) -> int:
    """Shard every recognised transformer block inside ``module`` over ``tp_mesh``, in place.

    Args:
        module: a pipeline stage (layers in an ``nn.Sequential``, or any module holding them).
        tp_mesh: the 1-D tensor-parallel ``DeviceMesh`` (``MeshGroups.tp_mesh``). A mesh of
            size 1 leaves ``module`` as it is.

    Returns:
        How many blocks were sharded (0 for a size-1 mesh or a stage of embeddings/heads only).

    Raises:
        ConfigError: heads, kv heads or the MLP width do not divide by the tp size, the
            stage holds a block type tensor parallelism does not support (GPT-2, any other
            unrecognised block with ``self_attn``), or a block is already sharded.

    Example (on each rank, after ``groups = build_mesh(MeshSpec(pp=2, tp=2))``)::

        for stage in mine.values():
            apply_tensor_parallel(stage, groups.tp_mesh)
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
    plans = [(block, _plan(block, size)) for block in _blocks(module)]
    for block, plan in plans:
        parallelize_module(block, tp_mesh, plan)
    return len(plans)


def check_tensor_parallel(module: nn.Module, tp: int) -> int:
    """Check, without a mesh, that ``module``'s blocks can be sharded over ``tp`` ranks.

    For validating a configuration before starting any process: the same checks
    :func:`apply_tensor_parallel` makes.

    Returns:
        How many blocks would be sharded (0 when ``tp`` is 1).

    Raises:
        ConfigError: as :func:`apply_tensor_parallel`.

    Example:
        >>> from stagewise.runtime.tiny_gpt import GPTConfig, gpt_layers
        >>> check_tensor_parallel(nn.Sequential(*gpt_layers(GPTConfig(heads=4, layers=2))), 2)
        2
    """
    if tp < 1:
        raise ConfigError(f"tp={tp}: the tensor-parallel size must be >= 1")
    if tp == 1:
        return 0
    return len([_plan(block, tp) for block in _blocks(module)])


def _blocks(module: nn.Module) -> Iterator[nn.Module]:
    """Every recognised block inside ``module`` (not descending into one).

    Refuses a block with attention that is not recognised (GPT-2, a mixture-of-experts MLP,
    ``nn.TransformerEncoderLayer``): left whole, it would run unsharded on every tp rank.
    """
    if _kind(module) is not None:
        yield module
        return
    if type(module).__name__ == "GPT2Block":
        raise ConfigError(
            "tensor parallelism is not supported for GPT-2 blocks (their fused Conv1D "
            "attention mixes q, k and v in one weight): use tp=1 for this model"
        )
    if isinstance(getattr(module, "self_attn", None), nn.Module):
        raise ConfigError(
            f"tensor parallelism is not supported for {type(module).__name__} blocks (only "
            "the tiny GPT's and Llama-style q/k/v/o_proj with gate/up/down_proj MLPs are "
            "sharded): use tp=1 for this model"
        )
    for child in module.children():
        yield from _blocks(child)


def _kind(module: nn.Module) -> str | None:
    """``"tiny_gpt"``, ``"llama"`` (q/k/v/o and gate/up/down projections) or None."""
    from stagewise.runtime.tiny_gpt import Block

    if isinstance(module, Block):
        return "tiny_gpt"
    attention, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
    attention_names = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_names = ("gate_proj", "up_proj", "down_proj")
    if (
        attention is not None
        and mlp is not None
        and all(isinstance(getattr(attention, n, None), nn.Linear) for n in attention_names)
        and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in mlp_names)
    ):
        return "llama"
    return None


def _plan(block: nn.Module, size: int) -> dict[str, ParallelStyle]:
    """The ``parallelize_module`` plan of one block, after checking its sizes divide."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in block.parameters()):
        raise ConfigError(
            f"a {type(block).__name__} is already sharded: call apply_tensor_parallel once "
            "per stage"
        )
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleOutput,
        RowwiseParallel,
    )

    from stagewise.runtime.tiny_gpt import Block

    colwise, rowwise = ColwiseParallel(), RowwiseParallel()
    # A norm feeding several column-parallel matmuls hands them one replicated DTensor, so
    # backward sums their partial input gradients and all-reduces once, not once per matmul.
    shared = PrepareModuleOutput(
        output_layouts=Replicate(), desired_output_layouts=Replicate(), use_local_output=False
    )
    if isinstance(block, Block):
        _divides("attention heads", block.heads, size, "GPTConfig(heads=...)")
        _divides("MLP width", _out_features(block, "mlp.0"), size, "GPTConfig(dim=...)")
        return {"norm1": shared, "q": colwise, "k": colwise, "v": colwise, "proj": rowwise,
                "mlp.0": colwise, "mlp.2": rowwise}
    config = getattr(block.get_submodule("self_attn"), "config", None)
    head_dim = int(getattr(block.get_submodule("self_attn"), "head_dim", 0)) or None
    heads = _heads(config, "num_attention_heads", block, "self_attn.q_proj", head_dim)
    kv_heads = _heads(config, "num_key_value_heads", block, "self_attn.k_proj", head_dim)
    _divides("attention heads", heads, size, "num_attention_heads")
    _divides("key/value heads", kv_heads, size, "num_key_value_heads")
    _divides("MLP width", _out_features(block, "mlp.up_proj"), size, "intermediate_size")
    norms = ("input_layernorm", "post_attention_layernorm")
    return {
        **{name: shared for name in norms if isinstance(getattr(block, name, None), nn.Module)},
        "self_attn.q_proj": colwise, "self_attn.k_proj": colwise, "self_attn.v_proj": colwise,
        "self_attn.o_proj": rowwise,
        "mlp.gate_proj": colwise, "mlp.up_proj": colwise, "mlp.down_proj": rowwise,
    }


def _out_features(block: nn.Module, name: str) -> int:
    linear = block.get_submodule(name)
    assert isinstance(linear, nn.Linear), f"{name} is not a Linear"
    return linear.out_features


def _heads(
    config: object, setting: str, block: nn.Module, projection: str, head_dim: int | None
) -> int:
    """A head count from the attention's config, else the projection's width / head size."""
    value = getattr(config, setting, None)
    if value is not None:
        return int(value)
    if head_dim is None:
        raise ConfigError(
            f"cannot tell the {setting} of {type(block).__name__}: its attention has no "
            "config and no head_dim; use tp=1 for this model"
        )
    return _out_features(block, projection) // head_dim


def _divides(what: str, count: int, size: int, setting: str) -> None:
    if count % size:
        raise ConfigError(
            f"tp={size} does not divide the {count} {what}: use a tp that divides {count} "
            f"or change {setting} to a multiple of {size}"
        )
