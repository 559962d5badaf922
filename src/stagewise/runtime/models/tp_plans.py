"""Tensor-parallel plans of the Hugging Face families, and of any model built from known blocks.

``llama_plan``: a decoder layer with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``
(Llama; Qwen2 and Mistral share the layout, only Llama is tested): q/k/v and gate/up
column-parallel, o and down row-parallel, the two norms ``shared``. GPT-2 blocks are refused:
their fused ``Conv1D`` attention mixes q, k and v in one weight, not shardable by head; so are
blocks with per-head q/k norms (Qwen3), whose one weight would see each rank's heads only.
``known_blocks_plan`` (for ``py:`` models, whose blocks stagewise does not know in advance)
takes the tiny GPT's blocks and Llama-style layers.
"""

from __future__ import annotations

from torch import nn

from stagewise.errors import ConfigError
from stagewise.runtime.models import tiny_gpt
from stagewise.runtime.parallel.tensor_parallel import BlockPlan

__all__ = ["known_blocks_plan", "llama_plan"]

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def llama_plan(module: nn.Module) -> BlockPlan | None:
    """The plan of a Llama-style decoder layer; None for other modules.

    Raises:
        ConfigError: ``module`` is a GPT-2 block, or its head counts cannot be told.
    """
    if type(module).__name__ == "GPT2Block":
        raise ConfigError(
            "tensor parallelism is not supported for GPT-2 blocks (their fused Conv1D "
            "attention mixes q, k and v in one weight): use tp=1 for this model"
        )
    attention, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
    if attention is None or mlp is None or not (
        all(isinstance(getattr(attention, n, None), nn.Linear) for n in _ATTENTION)
        and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in _MLP)
    ):
        return None
    norms_per_head = [n for n in ("q_norm", "k_norm") if getattr(attention, n, None) is not None]
    if norms_per_head:
        raise ConfigError(
            f"tensor parallelism is not supported for {type(module).__name__} (its "
            f"{' and '.join(norms_per_head)} normalise every head with one shared weight, whose "
            "gradient each tp rank would see only for its own heads): use tp=1 for this model "
            "(pp, dp and fsdp still apply)"
        )
    config = getattr(attention, "config", None)
    head_dim = int(getattr(attention, "head_dim", 0)) or None
    heads = _heads(config, "num_attention_heads", module, attention.q_proj, head_dim)
    kv_heads = _heads(config, "num_key_value_heads", module, attention.k_proj, head_dim)
    norms = [n for n in ("input_layernorm", "post_attention_layernorm")
             if isinstance(getattr(module, n, None), nn.Module)]
    return BlockPlan(
        styles={
            **dict.fromkeys(norms, "shared"),
            "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise",
            "self_attn.v_proj": "colwise", "self_attn.o_proj": "rowwise",
            "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise",
        },
        divisible=(("attention heads", heads, "num_attention_heads"),
                   ("key/value heads", kv_heads, "num_key_value_heads"),
                   ("MLP width", mlp.up_proj.out_features, "intermediate_size")),
    )


def known_blocks_plan(module: nn.Module) -> BlockPlan | None:
    """The tiny GPT's plan or :func:`llama_plan`, whichever recognises ``module``."""
    return tiny_gpt.tp_plan(module) or llama_plan(module)


def _heads(config: object, setting: str, block: nn.Module, projection: nn.Linear,
           head_dim: int | None) -> int:
    """A head count from the attention's config, else the projection's width / head size."""
    value = getattr(config, setting, None)
    if value is not None:
        return int(value)
    if head_dim is None:
        raise ConfigError(
            f"cannot tell the {setting} of {type(block).__name__}: its attention has no "
            "config and no head_dim; use tp=1 for this model"
        )
    return projection.out_features // head_dim
