"""A local Hugging Face model folder as pipeline layers, its weights read per rank.

``stagewise train --model ./folder`` trains the model a folder holds: ``config.json``, the
weights as ``model.safetensors`` or shards listed in ``model.safetensors.index.json``, and
usually the tokenizer. :func:`check_model_folder` checks all of it before any rank starts
(every problem a one-line :class:`ConfigError` with the fix); :func:`folder_parts` builds the
model empty (parameters on the meta device), cuts it like ``hf_models.hf_layers`` and returns
a materializer that reads each layer's tensors from the safetensors files when a rank asks
for that layer, so no rank ever holds more than its own stages and one tensor in flight.

Families: Llama, Mistral and Qwen2 (the same decoder layout) and GPT-2. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagewise.errors import ConfigError
from stagewise.runtime.models.folder_weights import (
    FolderMaterializer,
    TensorEntry,
    match_names,
    read_headers,
)
from stagewise.runtime.models.hf_models import DEFAULT_SEQ_LEN, hf_layers
from stagewise.runtime.models.lazy_init import empty_parameters
from stagewise.runtime.models.model_parts import ModelParts
from stagewise.runtime.models.tp_plans import llama_plan

__all__ = [
    "LAYOUTS",
    "FolderInfo",
    "build_folder_model",
    "check_model_folder",
    "folder_parts",
    "is_model_folder",
    "read_model_config",
]

# model_type -> the layout stagewise cuts it by (see hf_models.hf_layers).
LAYOUTS = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gpt2": "gpt2"}
# Config keys each layout needs (alternatives: either name), never filled from defaults.
REQUIRED = {
    "llama": ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size",
              "intermediate_size"),
    "gpt2": (("n_layer", "num_hidden_layers"), ("n_embd", "hidden_size"),
             ("n_head", "num_attention_heads"), "vocab_size"),
}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FETCH = "hf download {id} --local-dir DIR (or huggingface-cli download {id} --local-dir DIR)"


@dataclass(frozen=True)
class FolderInfo:
    """What a model folder holds, read from its config and the weights' headers.

    Attributes:
        path: the folder.
        config: ``config.json`` as a dict.
        model_type: the config's ``model_type`` (``llama``, ``mistral``, ``qwen2``, ``qwen3``,
            ``gpt2``).
        layout: how it is cut: ``"llama"`` or ``"gpt2"``.
        weight_files: the safetensors files, in order.
        tensors: tensor name in the files -> its file, shape and dtype.
        has_tokenizer: the folder holds tokenizer files.
    """

    path: Path
    config: dict[str, Any]
    model_type: str
    layout: str
    weight_files: tuple[Path, ...]
    tensors: dict[str, TensorEntry]
    has_tokenizer: bool

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, as the files hold them."""
        return {name: entry.shape for name, entry in self.tensors.items()}


def is_model_folder(spec: str) -> bool:
    """Whether ``--model spec`` means a model folder: anything but ``tiny``, ``hf:...`` and
    ``py:...`` (a path, or a Hugging Face id, which :func:`check_model_folder` refuses with
    how to fetch it).

    Example:
        >>> is_model_folder("./my-llama"), is_model_folder("hf:llama"), is_model_folder("tiny")
        (True, False, False)
    """
    return spec != "tiny" and not spec.startswith(("hf:", "py:"))


def check_model_folder(path: str | os.PathLike[str]) -> FolderInfo:
    """Check a model folder before launch: config, weights, and that they fit each other.

    Raises:
        ConfigError: not a folder (a Hugging Face id: how to fetch it), no or bad config.json,
            an unsupported ``model_type``, config keys the family needs missing, no
            safetensors weights (``.bin`` files are named as unsupported), or weights that do
            not match the config (missing, extra or misshaped tensors, a few named of each).

    Example:
        >>> check_model_folder("org/model")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        stagewise.errors.ConfigError: model 'org/model' is not a local folder...
    """
    info = read_folder(path)
    match_weights(info, build_folder_model(info.path, info.config))
    return info


def read_folder(path: str | os.PathLike[str]) -> FolderInfo:
    """The folder's config and weight headers, checked on their own (see
    :func:`check_model_folder`, which also checks them against each other)."""
    folder = _folder(path)
    config = read_model_config(folder)
    files = _weight_files(folder)
    model_type = config["model_type"]
    return FolderInfo(
        path=folder, config=config, model_type=model_type, layout=LAYOUTS[model_type],
        weight_files=files, tensors=read_headers(files),
        has_tokenizer=any((folder / name).is_file() for name in TOKENIZER_FILES),
    )


def _folder(path: str | os.PathLike[str]) -> Path:
    folder = Path(path)
    if folder.is_dir():
        return folder
    if folder.is_file():
        where = folder.parent if folder.name == "config.json" else None
        hint = f"pass its folder {str(where)!r}" if where else "pass the folder holding config.json"
        raise ConfigError(f"model {str(path)!r} is a file, not a model folder: {hint}")
    if _MODEL_ID.match(str(path)) and not str(path).startswith("."):
        raise ConfigError(
            f"model {str(path)!r} is not a local folder, and stagewise downloads nothing: "
            f"fetch it first with {_FETCH.format(id=path)} and pass --model DIR"
        )
    raise ConfigError(
        f"model folder {str(path)!r} does not exist: pass a local Hugging Face model folder "
        "(config.json and safetensors weights)"
    )


def read_model_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json``, checked: a supported ``model_type`` and the keys it needs.

    Raises:
        ConfigError: no or bad config.json, another model_type, keys missing.
    """
    config = _config(folder)
    model_type = config.get("model_type")
    if model_type not in LAYOUTS:
        raise ConfigError(
            f"{str(folder / 'config.json')!r} has model_type {model_type!r}: supported are "
            f"{', '.join(LAYOUTS)}; use a model of one of these families"
        )
    _require_keys(folder, config, LAYOUTS[model_type])
    return config


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"model folder {str(folder)!r} has no config.json: pass the folder that "
            "save_pretrained wrote (config.json beside the weights)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{str(path)!r} is not readable JSON ({err}): re-save the model"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} must hold a JSON object of config fields")
    return data


def _require_keys(folder: Path, config: dict[str, Any], layout: str) -> None:
    missing = []
    for need in REQUIRED[layout]:
        names = need if isinstance(need, tuple) else (need,)
        if not any(config.get(name) is not None for name in names):
            missing.append(names[0])
    if missing:
        raise ConfigError(
            f"{str(folder / 'config.json')!r} lacks {', '.join(missing)}: a "
            f"{config['model_type']} model needs them (stagewise fills no defaults); add them "
            "to config.json with the sizes of the weights"
        )


def _weight_files(folder: Path) -> tuple[Path, ...]:
    index = folder / INDEX
    if index.is_file():
        return _shards(index)
    if (folder / SINGLE).is_file():
        return (folder / SINGLE,)
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if others:
        raise ConfigError(
            f"model folder {str(folder)!r} holds {', '.join(others[:3])}: PyTorch .bin weights "
            "are not supported (they unpickle whole); convert them to safetensors: load with "
            "from_pretrained and save_pretrained(DIR) again"
        )
    loose = sorted(p.name for p in folder.glob("*.safetensors"))
    found = f" (it has {', '.join(loose[:3])} but no {INDEX})" if loose else ""
    raise ConfigError(
        f"model folder {str(folder)!r} has no weights{found}: it needs {SINGLE} or {INDEX} "
        "with its shards; re-save the model with save_pretrained"
    )


def _shards(index: Path) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(
            f"{str(index)!r} is not a safetensors index (weight_map: tensor -> file): {err!r}; "
            "re-save the model with save_pretrained"
        ) from None
    files = tuple(index.parent / name for name in names)
    lost = [f.name for f in files if not f.is_file()]
    if lost:
        raise ConfigError(
            f"{str(index)!r} lists {len(lost)} shard(s) the folder lacks ({', '.join(lost[:3])}): "
            "copy every shard of the model into the folder"
        )
    return files


def build_folder_model(folder: Path, fields: dict[str, Any]) -> nn.Module:
    """The causal LM of config ``fields`` (read from ``folder``: see
    :func:`read_model_config`) built empty: float32 parameters on the meta device, sdpa."""
    from stagewise.runtime.models.hf_models import _transformers

    transformers = _transformers()
    model_type = fields["model_type"]
    try:
        config = transformers.CONFIG_MAPPING[model_type].from_dict(
            {k: v for k, v in fields.items() if k != "model_type"}
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{str(folder / 'config.json')!r} is not a valid config: {err}"
        ) from None
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]), empty_parameters():
        try:
            model: nn.Module = transformers.AutoModelForCausalLM.from_config(config)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"cannot build {model_type} from {folder}: {err}") from None
    return model.float().train()


def match_weights(info: FolderInfo, model: nn.Module) -> FolderMaterializer:
    """A materializer for ``model`` from ``info``'s files, once the weights match the config.

    Raises:
        ConfigError: tensors missing, extra or misshaped (a few named of each, with counts).
    """
    match = match_names(model, info.tensors, info.layout)
    problem = match.problem()
    if problem is not None:
        raise ConfigError(
            f"the weights of {str(info.path)!r} do not match its config.json: {problem}; "
            "use the config the weights were saved with"
        )
    return FolderMaterializer(model, match.sources)


def folder_parts(
    path: str | os.PathLike[str], *, seq_len: int | None = None, seed: int = 0,
    empty: bool = True,
) -> ModelParts:
    """The model of a local Hugging Face folder as :class:`ModelParts`, weights read lazily.

    Args:
        path: the folder (see :func:`check_model_folder`).
        seq_len: tokens per sequence; None for ``min(32, max positions)``.
        seed: the seed of ``make_batch``'s generated data (the weights are the folder's).
        empty: leave the parameters on the meta device; ``parts.materialize(modules)`` reads
            those of ``modules`` from the safetensors files. False reads every layer now.

    Returns:
        Parts cut as ``hf_layers`` cuts them, with the family's tensor-parallel plan, the mean
        next-token cross-entropy and generated counting data over the model's vocabulary.

    Raises:
        ConfigError: as :func:`check_model_folder`; ``seq_len`` outside the model's positions
            or beyond its sliding window.
    """
    from stagewise.runtime.models.tiny_gpt import GPTConfig, lm_loss, make_batch

    del seed  # the data generator is seeded per step by the trainer; weights come from files
    info = read_folder(path)
    model = build_folder_model(info.path, info.config)
    materializer = match_weights(info, model)
    config: Any = model.config
    length = _seq_len(info, config, seq_len)
    data = GPTConfig(vocab=int(config.vocab_size), seq_len=length)

    def batch(rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return make_batch(data, rows, generator)

    layers, ties = hf_layers(model)
    if not empty:
        materializer(layers)
    return ModelParts(
        name=f"{info.model_type}:{info.path}", layers=tuple(layers), loss_fn=lm_loss,
        make_batch=batch, seq_len=length, ties=ties,
        materialize=materializer if empty else None, tp_plan=llama_plan,
    )


def _seq_len(info: FolderInfo, config: Any, seq_len: int | None) -> int:
    limit = int(getattr(config, "max_position_embeddings", 0) or config.n_positions)
    length = min(DEFAULT_SEQ_LEN, limit) if seq_len is None else seq_len
    if not 1 <= length <= limit:
        raise ConfigError(
            f"seq_len {length} is outside 1..{limit} (max positions of {str(info.path)!r}): "
            "use a shorter --seq-len"
        )
    window = _sliding_window(config)
    if window is not None and length > window:
        raise ConfigError(
            f"seq_len {length} exceeds the sliding window {window} of {str(info.path)!r}, which "
            f"stagewise does not apply: use --seq-len {window} or less"
        )
    return length


def _sliding_window(config: Any) -> int | None:
    """The attention window a Mistral or Qwen2/3 config applies, or None for full attention."""
    window = getattr(config, "sliding_window", None)
    if window is None or config.model_type == "llama":
        return None
    if (config.model_type in ("qwen2", "qwen3")
            and "sliding_attention" not in (config.layer_types or ())):
        return None
    return int(window)
