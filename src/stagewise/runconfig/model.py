"""The model section of a run configuration: which model, its sizes or its HF config."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stagewise.errors import ConfigError
from stagewise.runconfig._toml import _check_toml_values, _positive

__all__ = ["ModelConfig"]

TINY_DEFAULTS = {"layers": 6, "dim": 64}  # stagewise train's --layers and --dim defaults
_TINY_SIZES = ("layers", "dim", "heads")  # the sizes only spec = "tiny" takes
# Hugging Face config keys that give layers, query heads and key/value heads, per family.
_HF_LAYERS = ("num_hidden_layers", "n_layer")
_HF_HEADS = ("num_attention_heads", "n_head")
_HF_KV_HEADS = ("num_key_value_heads",)
_HF_POSITIONS = ("max_position_embeddings", "n_positions")
_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # a Hugging Face id: org/name


@dataclass(frozen=True)
class ModelConfig:
    """What is trained.

    Attributes:
        spec: ``"tiny"`` (stagewise's tiny GPT), ``"hf:llama"``, ``"hf:gpt2"`` (Hugging Face
            model with random weights) or ``"py:package.module:function"``.
        layers, dim, heads: the tiny GPT's blocks, width and attention heads (``tiny`` only;
            defaults 6, 64 and 4, or 1 head when the width is not a multiple of 4).
        hf_config: Hugging Face config fields for ``hf:`` models (``hidden_size``,
            ``num_hidden_layers``, ...); empty for the runtime's small default.
        split: for ``py:`` models, submodule names in the order they run.
        config_file: for ``hf:`` models, a Hugging Face ``config.json`` to read instead of
            ``hf_config`` (``--model-config FILE``; read when the model is built).
    """

    spec: str = "tiny"
    layers: int | None = None
    dim: int | None = None
    heads: int | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)
    split: tuple[str, ...] = ()
    config_file: str | None = None

    def __post_init__(self) -> None:
        self._check_spec()
        if self.spec == "tiny":
            self._fill_tiny_sizes()
        else:
            self._refuse_tiny_sizes()
        self._check_hf_config()
        self._check_split()
        self._check_config_file()

    def _check_spec(self) -> None:
        spec = self.spec
        if not isinstance(spec, str) or (spec.startswith(("hf:", "py:")) and len(spec) <= 3):
            raise ConfigError(
                f"[model] spec = {spec!r}: write \"tiny\", \"hf:llama\", \"hf:gpt2\", "
                "\"py:package.module:function\" or the path of a Hugging Face model folder"
            )
        if self.is_folder and not Path(spec).is_dir():
            fetch = (f"; nothing is downloaded: fetch it first (hf download {spec} --local-dir "
                     "DIR) and pass DIR" if _MODEL_ID.fullmatch(spec) else "")
            raise ConfigError(
                f"[model] spec = {spec!r} is not a local folder, nor \"tiny\", \"hf:llama\", "
                f"\"hf:gpt2\" or \"py:package.module:function\"{fetch}"
            )

    def _fill_tiny_sizes(self) -> None:
        """The tiny GPT's layers, dim and heads: defaults for those not given, then checked."""
        dim = TINY_DEFAULTS["dim"] if self.dim is None else self.dim
        object.__setattr__(self, "dim", dim)
        defaults = {"layers": TINY_DEFAULTS["layers"], "dim": dim, "heads": self.default_heads}
        for name in _TINY_SIZES:
            if getattr(self, name) is None:
                object.__setattr__(self, name, defaults[name])
            _positive("model", name, getattr(self, name))
        if self.dim % self.heads:  # type: ignore[operator]
            raise ConfigError(
                f"[model] dim = {self.dim} is not a multiple of heads = {self.heads}: "
                "choose heads that divide dim"
            )

    def _refuse_tiny_sizes(self) -> None:
        given = [name for name in _TINY_SIZES if getattr(self, name) is not None]
        if given:
            raise ConfigError(
                f"[model] {', '.join(given)} apply to spec = \"tiny\" only; for {self.spec!r} "
                "set the sizes in [model.hf_config] (e.g. num_hidden_layers, hidden_size)"
            )

    def _check_hf_config(self) -> None:
        if not isinstance(self.hf_config, Mapping):
            raise ConfigError(f"[model.hf_config] must be a table, got {self.hf_config!r}")
        if self.hf_config and not self.spec.startswith("hf:"):
            raise ConfigError(
                f"[model.hf_config] applies to hf: models only, not {self.spec!r}: remove it"
            )
        object.__setattr__(self, "hf_config", dict(self.hf_config))
        _check_toml_values("model.hf_config", self.hf_config)

    def _check_split(self) -> None:
        split = self.split
        if isinstance(split, list):
            split = tuple(split)
            object.__setattr__(self, "split", split)
        if not isinstance(split, tuple) or not all(isinstance(s, str) and s for s in split):
            raise ConfigError(f"[model] split must be a list of names, got {split!r}")
        if split and not self.spec.startswith("py:"):
            raise ConfigError(f"[model] split applies to py: models only, not {self.spec!r}")

    def _check_config_file(self) -> None:
        if self.config_file is not None and not self.spec.startswith("hf:"):
            raise ConfigError(
                f"[model] config_file (--model-config) applies to hf: models only, "
                f"not {self.spec!r}"
            )
        if self.config_file is not None and self.hf_config:
            raise ConfigError("[model] give hf_config or config_file, not both")

    @property
    def default_heads(self) -> int:
        """``stagewise train``'s head count for the tiny GPT's width: 4, or 1 if 4 does not
        divide it."""
        return 4 if isinstance(self.dim, int) and self.dim % 4 == 0 else 1

    @property
    def is_folder(self) -> bool:
        """The spec is a local Hugging Face model folder (not tiny, hf: or py:)."""
        return self.spec != "tiny" and not self.spec.startswith(("hf:", "py:"))

    def _fields(self) -> Mapping[str, Any]:
        """The HF config fields the checks read: ``hf_config``, or a folder's config.json."""
        if not self.is_folder:
            return self.hf_config
        try:
            loaded = json.loads((Path(self.spec) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # the runtime's folder check names what is wrong with it
        return loaded if isinstance(loaded, dict) else {}

    def _hf(self, keys: tuple[str, ...]) -> int | None:
        fields = self._fields()
        for key in keys:
            value = fields.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    @property
    def num_layers(self) -> int | None:
        """Transformer blocks, when the config says (None: the runtime decides)."""
        return self.layers if self.spec == "tiny" else self._hf(_HF_LAYERS)

    @property
    def max_positions(self) -> int | None:
        """Longest sequence an ``hf:`` config allows, when it says (None otherwise)."""
        return None if self.spec == "tiny" else self._hf(_HF_POSITIONS)

    @property
    def num_heads(self) -> int | None:
        """Attention (query) heads, when the config says."""
        return self.heads if self.spec == "tiny" else self._hf(_HF_HEADS)

    @property
    def num_kv_heads(self) -> int | None:
        """Key/value heads, when the config says (the query heads without grouped query)."""
        return self._hf(_HF_KV_HEADS) or self.num_heads
