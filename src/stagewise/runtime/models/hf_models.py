"""Hugging Face Llama and GPT-2 causal language models as pipeline layers.

:func:`hf_parts` builds the model from a config with random weights (nothing is downloaded) and
cuts it into layers that each take and return one tensor, the form the pipeline sends between
stages:

- the embedding (Llama: ``embed_tokens``; GPT-2: ``wte`` plus ``wpe`` plus dropout), fed token
  ids ``(rows, seq)``;
- one layer per decoder block, doing what the Hugging Face model's forward does around it:
  positions ``0..seq-1``, the causal mask (``create_causal_mask``, as the model builds it) and,
  for Llama, the rotary cos/sin (each block layer holds a copy of the model's rotary module,
  which has buffers only);
- the head: final norm and ``lm_head``, returning logits ``(rows, seq, vocab)``.

The layers hold the model's own modules, so a layer's parameter is the model's Parameter object.
Tied input and output embeddings (GPT-2 by default; Llama with ``tie_word_embeddings``) stay one
Parameter in this process and are listed in ``ModelParts.ties`` for the pipeline.

``transformers`` is imported only when a model is built (``pip install 'stagewise[hf]'``).
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagewise.errors import ConfigError
from stagewise.runtime.models.lazy_init import Materializer, empty_parameters, materialize
from stagewise.runtime.models.model_parts import ModelParts
from stagewise.runtime.models.tp_plans import llama_plan

__all__ = ["FAMILIES", "build_hf_model", "hf_config", "hf_layers", "hf_parts"]

FAMILIES = ("llama", "gpt2")
# Decoders with Llama's module layout (model.embed_tokens, model.layers, model.norm, lm_head).
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
ATTENTIONS = ("sdpa", "eager")  # deterministic on CPU; the first is the default
DEFAULT_SEQ_LEN = 32

# Tiny defaults (dropout 0): fields a mapping given to ``hf_config`` overrides.
_TINY: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "tie_word_embeddings": False,
        "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None,
    },
    "gpt2": {
        "vocab_size": 64, "n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 128,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "bos_token_id": 0, "eos_token_id": 1,
    },
}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "Hugging Face models need the transformers package: pip install 'stagewise[hf]'"
        ) from None
    return transformers


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ConfigError(
            f"unknown Hugging Face model family {family!r}: choose one of {', '.join(FAMILIES)}"
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"model config file {str(path)!r} does not exist: give the path of a Hugging Face "
            "config.json"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"model config file {str(path)!r} is not JSON ({err}): give a Hugging Face "
            "config.json"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"model config file {str(path)!r} must hold a JSON object of fields")
    return data


def _require_sizes(family: str, fields: Mapping[str, Any], where: str) -> None:
    """A config file must give the sizes: Hugging Face's defaults (a 32-layer Llama) are
    never what a user who forgot a key meant."""
    from stagewise.runtime.models.hf_folder import REQUIRED

    missing = [need[0] if isinstance(need, tuple) else need for need in REQUIRED[family]
               if not any(fields.get(name) is not None
                          for name in (need if isinstance(need, tuple) else (need,)))]
    if missing:
        raise ConfigError(
            f"{where} lacks {', '.join(missing)}: a {family} model needs them (stagewise fills "
            "no defaults); add them with the sizes you want"
        )


def hf_config(family: str, config: Mapping[str, Any] | str | Path | None = None) -> Any:
    """The Hugging Face config of ``family`` (``"llama"`` or ``"gpt2"``).

    Args:
        family: the model family.
        config: None for the tiny default (hidden 64, 4 layers, vocabulary 64, dropout 0); a
            mapping of config fields laid over that tiny default; or the path of a
            ``config.json``, read as Hugging Face reads it (its fields over the library's
            defaults, which for GPT-2 include dropout 0.1). An ``attn_implementation`` field
            may pick ``"eager"``; the default is ``"sdpa"``.

    Raises:
        ConfigError: unknown family, missing or non-JSON file, a config of another
            ``model_type``, fields Hugging Face rejects, transformers not installed.

    Example:
        >>> hf_config("gpt2", {"n_layer": 2}).n_layer
        2
    """
    _check_family(family)
    transformers = _transformers()
    if config is None or isinstance(config, Mapping):
        fields = {**_TINY[family], **dict(config or {})}
        where = "the given config"
    else:
        fields = _read_json(Path(config))
        where = f"config file {str(config)!r}"
    model_type = fields.pop("model_type", family)
    if model_type != family:
        raise ConfigError(
            f"{where} is for model_type {model_type!r}, not {family!r}: use --model "
            f"hf:{model_type} if that family is supported ({', '.join(FAMILIES)}), or a "
            f"{family} config"
        )
    if not isinstance(config, Mapping) and config is not None:
        _require_sizes(family, fields, where)
    attention = fields.pop("attn_implementation", ATTENTIONS[0])
    if attention not in ATTENTIONS:
        raise ConfigError(
            f"attn_implementation {attention!r} is not supported here: use one of "
            f"{', '.join(ATTENTIONS)}"
        )
    cls = transformers.CONFIG_MAPPING[family]
    try:
        result = cls.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where} is not a valid {family} config: {err}") from None
    result._attn_implementation = attention
    return result


def build_hf_model(
    family: str,
    config: Mapping[str, Any] | str | Path | None = None,
    *,
    seed: int = 0,
    empty: bool = False,
) -> nn.Module:
    """The causal LM of ``family`` with random weights drawn from ``seed`` (float32).

    The weights follow ``runtime.lazy_init``'s rule (normal with the config's
    ``initializer_range`` for matrices, zero biases, unit norms), each parameter drawn from
    ``seed`` and its name, so any subset of layers filled on its own gets the same values.
    ``empty`` leaves the parameters on the meta device (fill them with
    ``lazy_init.Materializer``). The caller's random state is not touched. See
    :func:`hf_config` for ``config``.
    """
    cfg = hf_config(family, config)
    transformers = _transformers()
    cls = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel}[family]
    with torch.random.fork_rng(devices=[]), empty_parameters():
        try:
            model: nn.Module = cls(cfg)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"cannot build {family} from its config: {err}") from None
    model = model.float().train()
    if not empty:
        materialize(model, seed, _init_std(model))
    return model


def _init_std(model: nn.Module) -> float:
    return float(getattr(getattr(model, "config", None), "initializer_range", 0.02))


class LlamaEmbedding(nn.Module):
    """Token ids ``(rows, seq)`` to hidden states ``(rows, seq, hidden)``."""

    def __init__(self, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.embed_tokens(ids)
        return out


class GPT2Embedding(nn.Module):
    """Token ids to token plus position embeddings, then dropout (as ``GPT2Model``)."""

    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding, drop: nn.Dropout) -> None:
        super().__init__()
        self.wte, self.wpe, self.drop = wte, wpe, drop

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        out: torch.Tensor = self.drop(self.wte(ids) + self.wpe(positions))
        return out


class DecoderBlock(nn.Module):
    """One Hugging Face decoder block with its positions, causal mask and (Llama) rotary.

    Attributes:
        block: the model's block (``LlamaDecoderLayer`` or ``GPT2Block``).
        rotary: a copy of Llama's rotary embedding (buffers only); None for GPT-2.
    """

    def __init__(self, block: nn.Module, config: Any, rotary: nn.Module | None) -> None:
        super().__init__()
        self.block = block
        self.rotary = rotary
        self.config = config
        from transformers.masking_utils import create_causal_mask

        # transformers 5 renamed the mask builder's arguments; 4.x also needs cache positions.
        self.new_mask_api = "inputs_embeds" in inspect.signature(create_causal_mask).parameters

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = _causal_mask(self.config, hidden, positions, self.new_mask_api)
        if self.rotary is not None:
            out: Any = self.block(
                hidden, attention_mask=mask, position_ids=positions,
                position_embeddings=self.rotary(hidden, position_ids=positions),
            )
        else:
            out = self.block(hidden, attention_mask=mask, position_ids=positions)
        # Older transformers releases return a tuple whose first item is the hidden states.
        hidden_out: torch.Tensor = out[0] if isinstance(out, tuple) else out
        return hidden_out


def _causal_mask(
    config: Any, hidden: torch.Tensor, positions: torch.Tensor, new_api: bool
) -> Any:
    """The causal mask the Hugging Face model builds for ``hidden`` (None when the attention
    implementation applies causality itself)."""
    from transformers.masking_utils import create_causal_mask

    if new_api:
        return create_causal_mask(
            config=config, inputs_embeds=hidden, attention_mask=None, cache=None,
            position_ids=positions,
        )
    return create_causal_mask(
        config=config, input_embeds=hidden, attention_mask=None,
        cache_position=positions[0], past_key_values=None, position_ids=positions,
    )


class LMHead(nn.Module):
    """Final norm and ``lm_head``: hidden states to logits ``(rows, seq, vocab)``."""

    def __init__(self, norm: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(self.norm(hidden))
        return out


def hf_layers(model: nn.Module) -> tuple[list[nn.Module], tuple[dict[int, str], ...]]:
    """Cut a Llama or GPT-2 causal LM into layers; also return the ties between them.

    The layers share the model's Parameters. A tie is ``{0: embedding weight name, last:
    lm_head weight name}`` when the model's ``lm_head.weight`` is its input embedding.

    Raises:
        ConfigError: the model is neither ``LlamaForCausalLM`` nor ``GPT2LMHeadModel``.
    """
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    head: Any = getattr(model, "lm_head", None)
    if model_type in LLAMA_LIKE:
        inner: Any = model.model
        first: nn.Module = LlamaEmbedding(inner.embed_tokens)
        blocks = [DecoderBlock(b, config, copy.deepcopy(inner.rotary_emb)) for b in inner.layers]
        last = LMHead(inner.norm, head)
        embedding, embedding_name = inner.embed_tokens, "embed_tokens.weight"
    elif model_type == "gpt2":
        inner = model.transformer
        first = GPT2Embedding(inner.wte, inner.wpe, inner.drop)
        blocks = [DecoderBlock(b, config, None) for b in inner.h]
        last = LMHead(inner.ln_f, head)
        embedding, embedding_name = inner.wte, "wte.weight"
    else:
        raise ConfigError(
            f"cannot cut a model of type {model_type!r} into layers: supported are "
            f"{', '.join((*LLAMA_LIKE, 'gpt2'))} causal LMs"
        )
    layers = [first, *blocks, last]
    ties: tuple[dict[int, str], ...] = ()
    if head.weight is embedding.weight:
        ties = ({0: embedding_name, len(layers) - 1: "lm_head.weight"},)
    return layers, ties


def hf_parts(
    family: str,
    config: Mapping[str, Any] | str | Path | None = None,
    *,
    seed: int = 0,
    seq_len: int | None = None,
    empty: bool = False,
) -> ModelParts:
    """A Hugging Face causal LM as :class:`ModelParts` (layers, loss, data, ties).

    Args:
        family: ``"llama"`` or ``"gpt2"``.
        config: see :func:`hf_config` (None: a tiny model).
        seed: weights come from this seed (the same model on every rank).
        seq_len: tokens per sequence of the generated data; None for
            ``min(32, max_position_embeddings)``.
        empty: leave the parameters on the meta device; ``parts.materialize(modules)`` fills
            those of the modules a rank keeps (the values of a full build).

    Returns:
        Parts whose ``loss_fn`` is the mean next-token cross-entropy and whose ``make_batch``
        gives the tiny GPT's learnable counting sequences over the model's vocabulary.

    Raises:
        ConfigError: as :func:`hf_config`, or ``seq_len`` above the model's
            ``max_position_embeddings``.

    Example:
        >>> parts = hf_parts("llama", {"num_hidden_layers": 2})
        >>> len(parts.layers)
        4
    """
    from stagewise.runtime.models.tiny_gpt import GPTConfig, lm_loss, make_batch

    model = build_hf_model(family, config, seed=seed, empty=empty)
    cfg: Any = model.config
    limit = int(cfg.max_position_embeddings)
    length = min(DEFAULT_SEQ_LEN, limit) if seq_len is None else seq_len
    if not 1 <= length <= limit:
        raise ConfigError(
            f"seq_len {length} is outside 1..{limit} (the {family} config's "
            f"max_position_embeddings): use a shorter sequence or raise max_position_embeddings"
        )
    data = GPTConfig(vocab=int(cfg.vocab_size), seq_len=length)

    def batch(rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return make_batch(data, rows, generator)

    layers, ties = hf_layers(model)
    return ModelParts(
        name=f"hf:{family}", layers=tuple(layers), loss_fn=lm_loss, make_batch=batch,
        seq_len=length, ties=ties,
        materialize=Materializer(model, seed, _init_std(model)) if empty else None,
        tp_plan=llama_plan,
    )
