"""Model shapes: the transformer a plan trains, from the catalog, a Hugging Face config or flags.

A :class:`ModelSpec` is a decoder-only transformer described by the numbers the memory and
time models need: layers, hidden size, attention heads (query and key/value heads, so grouped
query attention is covered), the MLP kind (``swiglu``: three matrices, or ``gelu``: two), the
vocabulary, whether input and output embeddings are tied, and whether linear layers carry biases
and dropout is used. Parameter counts here are exact for Llama- and GPT-2-style blocks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from stagewise.errors import PlanError

__all__ = [
    "POSITIONS",
    "ModelSpec",
    "catalog_models",
    "get_model",
    "hf_family_and_config",
    "model_from_hf_config",
    "toy_model",
]


POSITIONS = ("rope", "learned", "alibi")


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer.

    Attributes:
        name: catalog or file name.
        layers: transformer blocks (L).
        hidden: model width (h).
        heads: query heads (a).
        kv_heads: key/value heads (equal to ``heads`` without grouped-query attention).
        ffn: MLP inner width (f).
        vocab: vocabulary size before any padding (V).
        mlp: ``"swiglu"`` (gate, up, down) or ``"gelu"`` (up, down).
        norm: ``"rmsnorm"`` (weight only) or ``"layernorm"`` (weight and bias).
        tied_embeddings: output head shares the input embedding matrix.
        position: ``"rope"`` (no parameters, rotary kernels on q and k), ``"learned"`` (a
            max_seq_len x h table) or ``"alibi"`` (BLOOM's: a bias added to the attention
            scores, no parameters, no kernels of its own).
        bias: linear layers carry biases (GPT-2 style).
        dropout: the model trains with dropout (masks are stored for backward).
        max_seq_len: longest sequence the model was built for (learned positions need it).
    """

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    mlp: str = "swiglu"
    norm: str = "rmsnorm"
    tied_embeddings: bool = False
    position: str = "rope"
    bias: bool = False
    dropout: bool = False
    max_seq_len: int = 4096
    source: str = ""

    def __post_init__(self) -> None:
        for label in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "max_seq_len"):
            value = getattr(self, label)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(
                    f"model {self.name}: {label} must be a positive integer, got {value!r}"
                )
        if self.hidden % self.heads:
            raise PlanError(
                f"model {self.name}: hidden {self.hidden} is not a multiple of heads {self.heads}"
            )
        if self.heads % self.kv_heads:
            raise PlanError(
                f"model {self.name}: heads {self.heads} is not a multiple of kv_heads "
                f"{self.kv_heads} (grouped-query attention shares each key/value head)"
            )
        if self.mlp not in ("swiglu", "gelu"):
            raise PlanError(f"model {self.name}: mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise PlanError(
                f"model {self.name}: norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}"
            )
        if self.position not in POSITIONS:
            raise PlanError(
                f"model {self.name}: position must be one of {', '.join(POSITIONS)}, got "
                f"{self.position!r}"
            )

    # --- shapes ----------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        """Width of one attention head, h / a."""
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection: kv_heads x head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices in the MLP: 3 for SwiGLU, 2 for GELU."""
        return 3 if self.mlp == "swiglu" else 2

    def padded_vocab(self, tp: int = 1, multiple: int = 128) -> int:
        """Vocabulary padded to a multiple of ``multiple * tp`` (Megatron's rule)."""
        step = multiple * tp
        return -(-self.vocab // step) * step

    # --- parameters ------------------------------------------------------------------------

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one block's matrix multiplies: Q, K, V, output, and the MLP."""
        h = self.hidden
        attention = 2 * h * h + 2 * h * self.kv_dim
        return attention + self.mlp_matrices * h * self.ffn

    @property
    def layer_params(self) -> int:
        """All parameters of one block: matrices, biases and the two norms."""
        h = self.hidden
        norms = 2 * h * (2 if self.norm == "layernorm" else 1)
        biases = 0
        if self.bias:
            biases = (h + 2 * self.kv_dim) + h + (self.mlp_matrices - 1) * self.ffn + h
        return self.layer_matmul_params + norms + biases

    def embedding_params(self, tp: int = 1) -> int:
        """Input embedding (padded vocabulary) plus learned positions, if any."""
        positions = self.max_seq_len * self.hidden if self.position == "learned" else 0
        return self.padded_vocab(tp) * self.hidden + positions

    def head_params(self, tp: int = 1) -> int:
        """Final norm plus the output projection (0 extra matrix when tied: shared)."""
        norm = self.hidden * (2 if self.norm == "layernorm" else 1)
        return norm + (0 if self.tied_embeddings else self.padded_vocab(tp) * self.hidden)

    @property
    def num_params(self) -> int:
        """Total parameters (unpadded vocabulary), as a model card counts them."""
        positions = self.max_seq_len * self.hidden if self.position == "learned" else 0
        embed = self.vocab * self.hidden
        norm = self.hidden * (2 if self.norm == "layernorm" else 1)
        head = 0 if self.tied_embeddings else embed
        return self.layers * self.layer_params + embed + positions + norm + head


def _catalog() -> dict[str, dict[str, Any]]:
    text = resources.files("stagewise.plan").joinpath("data/models.json").read_text()
    data: dict[str, dict[str, Any]] = json.loads(text)
    data.pop("_comment", None)
    return data


def catalog_models() -> list[str]:
    """Names of the models in the catalog."""
    return sorted(_catalog())


def get_model(name: str) -> ModelSpec:
    """The catalog model ``name`` (case-insensitive).

    Raises:
        PlanError: unknown name; the message lists the catalog.

    Example:
        >>> get_model("llama-2-70b").kv_heads
        8
    """
    catalog = _catalog()
    key = name.lower()
    if key not in catalog:
        raise PlanError(
            f"unknown model {name!r}: choose one of {', '.join(sorted(catalog))} "
            "or pass --model-config config.json"
        )
    return ModelSpec(name=key, **catalog[key])


def model_from_hf_config(path: str | Path | dict[str, Any], name: str | None = None) -> ModelSpec:
    """Read a Hugging Face ``config.json`` (``llama``/``mistral``, ``gpt2`` or ``bloom`` model
    types; ``bloom`` for planning only: ``stagewise train`` builds the first two families).

    Raises:
        PlanError: unreadable file, unsupported model type or missing fields.
    """
    if isinstance(path, dict):
        config, label = path, name or "config"
    else:
        try:
            config = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise PlanError(f"cannot read model config {str(path)!r}: {err}") from None
        label = name or Path(path).parent.name or Path(path).stem
    if not isinstance(config, dict):
        raise PlanError(f"model config {label!r} is not a JSON object: give a config.json")
    kind = config.get("model_type", "")
    try:
        if kind in ("llama", "mistral"):
            heads = int(config["num_attention_heads"])
            act = config.get("hidden_act", "silu")
            return ModelSpec(
                name=label,
                layers=int(config["num_hidden_layers"]),
                hidden=int(config["hidden_size"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                ffn=int(config["intermediate_size"]),
                vocab=int(config["vocab_size"]),
                mlp="swiglu" if act in ("silu", "swish") else "gelu",
                norm="rmsnorm",
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                position="rope",
                bias=bool(config.get("attention_bias", False)),
                dropout=float(config.get("attention_dropout", 0.0) or 0.0) > 0,
                max_seq_len=int(config.get("max_position_embeddings", 4096)),
                source=f"Hugging Face config ({kind})",
            )
        if kind == "gpt2":
            hidden = int(config["n_embd"])
            return _gpt_style(config, label, hidden, int(config.get("n_inner") or 4 * hidden),
                              position="learned",
                              dropout=float(config.get("resid_pdrop", 0.1) or 0.0) > 0,
                              max_seq_len=int(config.get("n_positions", 1024)))
        if kind == "bloom":  # BloomMLP: dense_h_to_4h, dense_4h_to_h; ALiBi, no table
            # BloomConfig also reads the older names (bloom-560m's n_embed, num_attention_heads)
            hidden = int(config.get("hidden_size") or config["n_embed"])
            dropout = max(float(config.get("hidden_dropout") or 0.0),
                          float(config.get("attention_dropout") or 0.0))
            return _gpt_style(config, label, hidden, 4 * hidden, position="alibi",
                              dropout=dropout > 0,
                              max_seq_len=int(config.get("seq_length") or 2048),
                              heads=int(config.get("n_head") or config["num_attention_heads"]),
                              layers=int(config.get("n_layer") or config["num_hidden_layers"]))
    except KeyError as err:
        raise PlanError(f"model config {label!r} lacks field {err} for type {kind!r}") from None
    except (TypeError, ValueError) as err:
        raise PlanError(f"model config {label!r} has a field that is not a number: {err}") from None
    raise PlanError(
        f"model config {label!r} has model_type {kind!r}: supported are llama, mistral, "
        "gpt2 and bloom (bloom: planning only); describe other models with "
        "--layers/--hidden/... flags"
    )


def _gpt_style(
    config: dict[str, Any], label: str, hidden: int, ffn: int, *, position: str, dropout: bool,
    max_seq_len: int, heads: int | None = None, layers: int | None = None,
) -> ModelSpec:
    """A GPT-2-style block (GeLU MLP, LayerNorm, biases, full multi-head attention) from a
    Hugging Face config (gpt2, bloom): ``heads`` and ``layers`` default to its ``n_head``
    and ``n_layer``."""
    heads = int(config["n_head"]) if heads is None else heads
    return ModelSpec(
        name=label,
        layers=int(config["n_layer"]) if layers is None else layers,
        hidden=hidden,
        heads=heads,
        kv_heads=heads,
        ffn=ffn,
        vocab=int(config["vocab_size"]),
        mlp="gelu",
        norm="layernorm",
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        position=position,
        bias=True,
        dropout=dropout,
        max_seq_len=max_seq_len,
        source=f"Hugging Face config ({config.get('model_type')})",
    )


def hf_family_and_config(model: ModelSpec) -> tuple[str, dict[str, Any]]:
    """The Hugging Face family and config fields that build ``model`` (the inverse of
    :func:`model_from_hf_config`): what ``stagewise train --model hf:FAMILY`` runs.

    Llama-style shapes (SwiGLU, RMSNorm, rotary positions) give ``"llama"``; GPT-2-style
    shapes (GELU, LayerNorm, learned positions, biases, no grouped-query attention) give
    ``"gpt2"``. Fields the planner does not model (norm epsilon, rotary base) are left to
    Hugging Face's defaults.

    Raises:
        PlanError: a shape neither family builds.

    Example:
        >>> family, fields = hf_family_and_config(get_model("llama-2-70b"))
        >>> family, fields["num_key_value_heads"], fields["num_hidden_layers"]
        ('llama', 8, 80)
    """
    shape = (model.mlp, model.norm, model.position)
    if shape == ("swiglu", "rmsnorm", "rope"):
        return "llama", {
            "hidden_size": model.hidden,
            "intermediate_size": model.ffn,
            "num_hidden_layers": model.layers,
            "num_attention_heads": model.heads,
            "num_key_value_heads": model.kv_heads,
            "vocab_size": model.vocab,
            "max_position_embeddings": model.max_seq_len,
            "tie_word_embeddings": model.tied_embeddings,
            "hidden_act": "silu",
            "attention_bias": model.bias,
            "mlp_bias": model.bias,
            "attention_dropout": 0.1 if model.dropout else 0.0,
        }
    if shape == ("gelu", "layernorm", "learned") and model.bias and model.kv_heads == model.heads:
        dropout = 0.1 if model.dropout else 0.0
        return "gpt2", {
            "n_embd": model.hidden,
            "n_inner": model.ffn,
            "n_layer": model.layers,
            "n_head": model.heads,
            "vocab_size": model.vocab,
            "n_positions": model.max_seq_len,
            "tie_word_embeddings": model.tied_embeddings,
            "resid_pdrop": dropout,
            "embd_pdrop": dropout,
            "attn_pdrop": dropout,
        }
    raise PlanError(
        f"model {model.name} ({model.mlp}, {model.norm}, {model.position} positions, "
        f"{'' if model.bias else 'no '}biases, {model.kv_heads} of {model.heads} key/value "
        "heads) is neither a Llama nor a GPT-2 shape, so stagewise train cannot build it: "
        "describe it as one of those families"
    )


def toy_model(model: ModelSpec, num_stages: int, tp: int) -> ModelSpec:
    """A tiny model of ``model``'s family that keeps a plan's layout runnable on one machine.

    One block per (virtual) stage (at least 2); query heads 16 wide, a multiple of ``tp``, at
    least 4; grouped-query attention kept as ``tp`` key/value heads when ``model`` has it;
    MLP twice the width; 256-token vocabulary, 128 positions; norm, MLP kind, positions,
    biases, ties and dropout as ``model``.

    Example:
        >>> toy = toy_model(get_model("llama-2-70b"), num_stages=8, tp=4)
        >>> toy.layers, toy.hidden, toy.heads, toy.kv_heads
        (8, 128, 8, 4)
    """
    heads = tp * -(-4 // tp)
    grouped = model.kv_heads < model.heads
    if grouped and heads == tp:
        heads *= 2  # room for fewer key/value heads than query heads
    kv_heads = tp if grouped else heads
    hidden = 16 * heads
    return replace(
        model, name=f"{model.name}-toy", layers=max(2, num_stages), hidden=hidden, heads=heads,
        kv_heads=kv_heads, ffn=2 * hidden, vocab=256, max_seq_len=128,
        source=f"toy of {model.name} (stagewise toy_model)",
    )
