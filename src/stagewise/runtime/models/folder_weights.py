"""The weights of a Hugging Face model folder: safetensors headers, names, and lazy loading.

A model folder holds its weights as ``model.safetensors`` or as shards listed in
``model.safetensors.index.json``. :func:`read_headers` reads only the files' JSON headers (the
name, dtype and shape of every tensor; no data), so a folder is checked against its config
before anything is loaded. :func:`match_names` pairs the model's parameter names with the
file's, under the family's prefix conventions (GPT-2 checkpoints are written with or without
``transformer.``), and names what is missing, left over or misshaped.
:class:`FolderMaterializer` then fills the meta parameters of the layers a rank keeps, tensor
by tensor with ``safetensors.safe_open``: a rank reads its own layers and nothing else.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagewise.errors import ConfigError

__all__ = ["FolderMaterializer", "NameMatch", "match_names", "read_headers"]

# Per layout: the prefix of the base model's names, which some checkpoints leave out.
PREFIXES = {"llama": "model.", "gpt2": "transformer."}
# Tensors old checkpoints hold that the model no longer has (buffers, not weights).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
_SHOWN = 3  # names shown per kind of mismatch


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a safetensors file: where it is, its shape and its dtype name."""

    file: Path
    shape: tuple[int, ...]
    dtype: str


def read_headers(files: Iterable[Path]) -> dict[str, TensorEntry]:
    """Every tensor of ``files`` by name, from their headers alone (no tensor data is read).

    Raises:
        ConfigError: a file that is not safetensors, or a tensor name held by two files.
    """
    found: dict[str, TensorEntry] = {}
    for file in files:
        for name, entry in _header(file).items():
            if name in found:
                raise ConfigError(
                    f"tensor {name!r} is in both {found[name].file.name} and {file.name}: "
                    "the weight files overlap; keep one copy (re-save the model)"
                )
            found[name] = TensorEntry(file, tuple(entry["shape"]), str(entry["dtype"]))
    return found


def _header(file: Path) -> dict[str, Any]:
    """The tensor entries of one safetensors file's JSON header."""
    try:
        with file.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            if length > 100_000_000:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(stream.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise ConfigError(
            f"weight file {str(file)!r} is not a readable safetensors file ({err}): re-save "
            "the model with save_pretrained (safe_serialization)"
        ) from None
    if not isinstance(header, dict):
        raise ConfigError(f"weight file {str(file)!r} has no safetensors header")
    return {k: v for k, v in header.items() if k != "__metadata__"}


@dataclass(frozen=True)
class NameMatch:
    """The model's parameter names paired with the file's.

    Attributes:
        sources: model parameter name -> the file's tensor for it.
        missing: model parameters the files lack.
        extra: file tensors the model has no parameter for.
        misshaped: ``(name, shape in the file, shape in the model)``.
    """

    sources: Mapping[str, tuple[str, TensorEntry]]
    missing: tuple[str, ...]
    extra: tuple[str, ...]
    misshaped: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]

    def problem(self) -> str | None:
        """A one-line account of the mismatches (a few names of each, with counts), or None."""
        parts = []
        for label, names in (("missing", self.missing), ("extra", self.extra)):
            if names:
                parts.append(f"{len(names)} {label} ({_few(names)})")
        if self.misshaped:
            shown = ", ".join(
                f"{name} {list(file)} in the file, {list(model)} in the config"
                for name, file, model in self.misshaped[:_SHOWN]
            )
            count = len(self.misshaped)
            more = f", and {count - _SHOWN} more" if count > _SHOWN else ""
            parts.append(f"{count} misshaped ({shown}{more})")
        return "; ".join(parts) or None


def _few(names: tuple[str, ...]) -> str:
    more = f", and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def match_names(
    model: nn.Module, tensors: Mapping[str, TensorEntry], layout: str
) -> NameMatch:
    """Pair ``model``'s parameters (its names in the whole model) with the files' ``tensors``.

    A parameter is found under its own name or, for checkpoints written without the base
    prefix (``layout``'s: ``model.`` or ``transformer.``), under the name without it. A tied
    output embedding is one parameter under the input embedding's name, so it needs no
    ``lm_head.weight``; a file that holds one anyway is not an error (the tie wins, as in
    Hugging Face). Old buffers (GPT-2's ``attn.bias``, Llama's ``inv_freq``) are ignored.
    """
    prefix = PREFIXES[layout]
    sources: dict[str, tuple[str, TensorEntry]] = {}
    missing: list[str] = []
    misshaped = []
    for name, param in model.named_parameters():
        key = name if name in tensors else name.removeprefix(prefix)
        entry = tensors.get(key)
        if entry is None:
            missing.append(name)
        elif entry.shape != tuple(param.shape):
            misshaped.append((key, entry.shape, tuple(param.shape)))
        else:
            sources[name] = (key, entry)
    used = {key for key, _ in sources.values()} | {name for name, _, _ in misshaped}
    tied = {"lm_head.weight"} if _is_tied(model) else set()
    extra = sorted(
        key for key in tensors
        if key not in used and key not in tied and not key.endswith(_IGNORED_SUFFIXES)
    )
    return NameMatch(sources, tuple(missing), tuple(extra), tuple(misshaped))


def _is_tied(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    embeddings = getattr(model, "get_input_embeddings", None)
    return head is not None and embeddings is not None and head.weight is embeddings().weight


class FolderMaterializer:
    """Fills the meta parameters of parts of ``model`` from the folder's safetensors files.

    Only the parameters of the modules asked for are read, one tensor at a time
    (``safe_open(...).get_tensor``), each file opened once per call; values are cast to the
    parameter's dtype. A parameter the model holds twice (tied embeddings) is read once and
    stays one Parameter object in both modules.

    Args:
        model: the whole model, built with its parameters on the meta device.
        sources: model parameter name -> (file tensor name, entry), from :func:`match_names`.
    """

    def __init__(self, model: nn.Module, sources: Mapping[str, tuple[str, TensorEntry]]) -> None:
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.sources = dict(sources)
        uses: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        self._shared = {key for key, count in uses.items() if count > 1}
        self._filled: dict[int, nn.Parameter] = {}

    def __call__(self, modules: Iterable[nn.Module]) -> None:
        """Fill every meta parameter inside ``modules`` (on the CPU), in place."""
        wanted: dict[Path, list[tuple[nn.Module, str, nn.Parameter]]] = {}
        for module in modules:
            for owner in module.modules():
                for key, param in owner._parameters.items():
                    if param is None or param.device.type != "meta":
                        continue
                    if (real := self._filled.get(id(param))) is not None:
                        owner._parameters[key] = real
                        continue
                    file = self._source(param)[1].file
                    wanted.setdefault(file, []).append((owner, key, param))
        for file, slots in wanted.items():
            self._read(file, slots)

    def _source(self, param: nn.Parameter) -> tuple[str, TensorEntry]:
        name = self.names.get(id(param))
        if name is None or name not in self.sources:
            raise ValueError(f"parameter {name!r} has no tensor in the model folder: "
                             "materialize the model's own modules")
        return self.sources[name]

    def _read(self, file: Path, slots: list[tuple[nn.Module, str, nn.Parameter]]) -> None:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as weights:
            for owner, key, param in slots:
                real = self._filled.get(id(param))
                if real is None:
                    value = weights.get_tensor(self._source(param)[0])
                    real = nn.Parameter(value.to(param.dtype), requires_grad=param.requires_grad)
                    if id(param) in self._shared:
                        self._filled[id(param)] = real
                owner._parameters[key] = real


def tensor_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the parameters of ``modules`` (each counted once), real or meta."""
    seen: dict[int, torch.Tensor] = {}
    for module in modules:
        for param in module.parameters():
            seen[id(param)] = param
    return sum(p.numel() * p.element_size() for p in seen.values())
