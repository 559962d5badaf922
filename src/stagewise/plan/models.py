"""Model shapes: the transformer a plan trains, from the catalog, a Hugging Face config or flags.

A :class:`ModelSpec` is a decoder-only transformer described by the numbers the memory and
time models need: layers, hidden size, attention heads (query and key/value heads, so grouped
query attention is covered), the MLP kind (``swiglu``: three matrices, or ``gelu``: two), the
vocabulary, whether input and output embeddings are tied, and whether linear layers carry biases
and dropout is used. The head width is h / a unless a model says otherwise (``kv_channels``:
Mistral-NeMo, Qwen3 and Gemma project to heads x 128 or 256 whatever their width). Parameter
counts here are exact for Llama- and GPT-2-style blocks.
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
        kv_channels: width of one attention head where it is not h / a (Hugging Face's
            ``head_dim``, Megatron-LM's ``--kv-channels``); None: h / a.
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
    kv_channels: int | None = None

    def __post_init__(self) -> None:
        for label in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "max_seq_len"):
            value = getattr(self, label)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(
                    f"model {self.name}: {label} must be a positive integer, got {value!r}"
                )
        if self.kv_channels is not None and (
            isinstance(self.kv_channels, bool) or not isinstance(self.kv_channels, int)
            or self.kv_channels < 1
        ):
            raise PlanError(
                f"model {self.name}: kv_channels (the head width) must be a positive integer, "
                f"got {self.kv_channels!r}"
            )
        if self.kv_channels is None and self.hidden % self.heads:
            raise PlanError(
                f"model {self.name}: hidden {self.hidden} is not a multiple of heads "
                f"{self.heads}; give the head width (head_dim, --head-dim) if the model's "
                "heads are not hidden / heads wide"
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
        """Width of one attention head: ``kv_channels``, or h / a."""
        return self.kv_channels if self.kv_channels is not None else self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        """Width of the query projection (and of the attention output): heads x head_dim."""
        return self.heads * self.head_dim

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
        attention = 2 * h * self.q_dim + 2 * h * self.kv_dim
        return attention + self.mlp_matrices * h * self.ffn

    @property
    def layer_params(self) -> int:
        """All parameters of one block: matrices, biases and the two norms."""
        h = self.hidden
        norms = 2 * h * (2 if self.norm == "layernorm" else 1)
        biases = 0
        if self.bias:
            biases = (self.q_dim + 2 * self.kv_dim) + h + (self.mlp_matrices - 1) * self.ffn + h
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
    """Read a Hugging Face ``config.json`` of a dense decoder-only model.

    Llama-shaped families (gated MLP, RMSNorm, rotary positions): ``llama``, ``mistral``,
    ``qwen2``, ``qwen3``, ``phi3``, ``granite``, ``olmo2``, ``gemma``, ``gemma2``,
    ``gemma3_text``; GPT-shaped ones (two-matrix MLP, LayerNorm): ``gpt2``, ``bloom``,
    ``gpt_neox``, ``starcoder2``, ``phi``, ``mpt``, ``opt``. A ``head_dim`` that is not
    hidden / heads (Mistral-NeMo, Qwen3, Gemma) is kept as ``kv_channels``. What the shape
    leaves out is small and said in ``source``: Qwen2's biases on Q, K and V only (under
    0.01 % of the parameters, counted as none), Gemma 2/3's sliding-window layers (timed as
    full attention: slower than they run at sequences past the window), partial rotary
    (Pythia, Phi). Mixture-of-experts families are refused. ``stagewise train --model hf:``
    builds the ``llama`` and ``gpt2`` families; the rest are for planning and MFU.

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
    if kind in MOE_TYPES or config.get("num_local_experts") or config.get("num_experts"):
        raise PlanError(
            f"model config {label!r} ({kind!r}) is a mixture of experts: the planner models "
            "dense blocks only (every token through every weight), so its memory and time would "
            "be wrong; describe a dense model instead"
        )
    try:
        if kind in LLAMA_TYPES:
            return _llama_style(config, label, kind)
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
        if kind in GPT_TYPES:
            return _gpt_family(config, label, kind)
    except KeyError as err:
        raise PlanError(f"model config {label!r} lacks field {err} for type {kind!r}") from None
    except (TypeError, ValueError) as err:
        raise PlanError(f"model config {label!r} has a field that is not a number: {err}") from None
    raise PlanError(
        f"model config {label!r} has model_type {kind!r}: supported are "
        f"{', '.join(sorted((*LLAMA_TYPES, *GPT_TYPES, 'gpt2', 'bloom')))}; describe other "
        "models with --layers/--hidden/... flags"
    )


LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "olmo2", "gemma",
               "gemma2", "gemma3_text")
"""Hugging Face model types whose blocks are Llama's: gate, up and down projections, RMSNorm,
rotary positions (the activation, SiLU or GELU, does not change the shapes)."""
GPT_TYPES = ("gpt_neox", "starcoder2", "phi", "mpt", "opt")
"""Further types with a two-matrix MLP and LayerNorm (``gpt2`` and ``bloom`` read above)."""
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "dbrx",
             "olmoe", "phimoe", "jamba", "granitemoe", "llama4", "llama4_text", "gpt_oss")


def _llama_style(config: dict[str, Any], label: str, kind: str) -> ModelSpec:
    """A Llama-shaped block from its Hugging Face config."""
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    notes = []
    head_dim = config.get("head_dim")
    kv_channels = None
    if head_dim is not None and int(head_dim) * heads != hidden:
        kv_channels = int(head_dim)
    elif kind.startswith("gemma") and head_dim is None:
        kv_channels = 256  # GemmaConfig's default head_dim
    bias = bool(config.get("attention_bias", False))
    if kind == "qwen2":
        notes.append("biases on Q, K and V not counted")
    if kind in ("gemma2", "gemma3_text"):
        notes.append("sliding-window layers timed as full attention")
    tied = config.get("tie_word_embeddings")
    if tied is None:
        tied = kind.startswith("gemma")  # their configs' default; Llama's is False
    return ModelSpec(
        name=label,
        layers=int(config["num_hidden_layers"]),
        hidden=hidden,
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        ffn=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]),
        mlp="swiglu",
        norm="rmsnorm",
        tied_embeddings=bool(tied),
        position="rope",
        bias=bias,
        dropout=float(config.get("attention_dropout", 0.0) or 0.0) > 0,
        max_seq_len=int(config.get("max_position_embeddings", 4096)),
        kv_channels=kv_channels,
        source=f"Hugging Face config ({kind}{'; ' if notes else ''}{'; '.join(notes)})",
    )


def _gpt_family(config: dict[str, Any], label: str, kind: str) -> ModelSpec:
    """A two-matrix-MLP, LayerNorm block from its Hugging Face config (``GPT_TYPES``)."""
    if kind == "mpt":
        hidden = int(config["d_model"])
        attn = config.get("attn_config") or {}
        alibi = bool(attn.get("alibi", False))
        learned = bool(config.get("learned_pos_emb", True)) and not alibi
        dropout = max(float(config.get("resid_pdrop") or 0.0),
                      float(attn.get("attn_pdrop") or 0.0))
        return ModelSpec(
            name=label, layers=int(config["n_layers"]), hidden=hidden,
            heads=int(config["n_heads"]), kv_heads=int(attn.get("kv_n_heads") or
                                                          config["n_heads"]),
            ffn=int(float(config.get("expansion_ratio", 4)) * hidden),
            vocab=int(config["vocab_size"]), mlp="gelu", norm="layernorm",
            tied_embeddings=True, position="alibi" if alibi else "learned" if learned else "rope",
            bias=not bool(config.get("no_bias", True)), dropout=dropout > 0,
            max_seq_len=int(config.get("max_seq_len", 2048)), source="Hugging Face config (mpt)",
        )
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    position, notes = "rope", []
    if kind == "opt":
        ffn, position = int(config["ffn_dim"]), "learned"
        bias = bool(config.get("enable_bias", True))
        tied = config.get("tie_word_embeddings", True)
        dropout = float(config.get("dropout") or 0.0)
        if int(config.get("word_embed_proj_dim") or hidden) != hidden:
            notes.append("embedding projections not counted")
    else:
        ffn = int(config.get("intermediate_size") or 4 * hidden)
        bias = bool(config.get("use_bias", config.get("attention_bias", True)))
        tied = config.get("tie_word_embeddings", kind == "starcoder2")
        dropout = max(float(config.get("hidden_dropout") or config.get("resid_pdrop") or 0.0),
                      float(config.get("attention_dropout") or 0.0))
        partial = config.get("rotary_pct", config.get("partial_rotary_factor", 1.0))
        if partial is not None and float(partial) < 1.0:
            notes.append(f"rotary on {float(partial):.0%} of each head, timed as on all of it")
    return ModelSpec(
        name=label, layers=int(config["num_hidden_layers"]), hidden=hidden, heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads), ffn=ffn,
        vocab=int(config["vocab_size"]), mlp="gelu", norm="layernorm",
        tied_embeddings=bool(tied), position=position, bias=bias, dropout=dropout > 0,
        max_seq_len=int(config.get("max_position_embeddings", 2048)),
        source=f"Hugging Face config ({kind}{'; ' if notes else ''}{'; '.join(notes)})",
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
            "head_dim": model.head_dim,
        }
    if (shape == ("gelu", "layernorm", "learned") and model.bias and model.kv_heads == model.heads
            and model.q_dim == model.hidden):
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
        f"heads {model.head_dim} wide) is neither a Llama nor a GPT-2 shape, so stagewise "
        "train cannot build it: describe it as one of those families"
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
        kv_heads=kv_heads, ffn=2 * hidden, vocab=256, max_seq_len=128, kv_channels=None,
        source=f"toy of {model.name} (stagewise toy_model)",
    )
