"""Which model to train, by name: ``stagewise train --model SPEC``.

Forms of ``SPEC``:

- ``tiny``: the tiny GPT of ``stagewise.runtime.models.tiny_gpt``;
- ``hf:llama``, ``hf:gpt2``: a Hugging Face causal LM from a config with random weights
  (see ``hf_models``);
- ``py:package.module:attr``: ``attr`` is a callable (called with no arguments, or with the
  config's fields as keyword arguments) returning either :class:`ModelParts`, used as it is,
  or an ``nn.Module``, cut by submodule names (``--split``, see ``split_module``). Such a
  module is trained as a causal language model: token ids ``(rows, seq_len)`` in, logits
  ``(rows, seq_len, vocab)`` out, scored by next-token cross-entropy on the tiny GPT's
  generated counting data, with ``vocab`` the size of the module's first ``nn.Embedding``.
  Anything else: return ModelParts;
- anything else: the path of a local Hugging Face model folder (config.json, safetensors
  weights, tokenizer), read per rank (see ``hf_folder``); nothing is downloaded.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagewise.errors import ConfigError
from stagewise.runtime.models.model_parts import ModelParts, tiny_gpt_parts
from stagewise.runtime.models.tiny_gpt import GPTConfig

__all__ = ["FORMS", "resolve_model"]

FORMS = ("tiny", "hf:llama", "hf:gpt2", "py:package.module:attr", "PATH (a Hugging Face folder)")
DEFAULT_SEQ_LEN = 32


def resolve_model(
    spec: str,
    *,
    config: Mapping[str, Any] | str | Path | None = None,
    seed: int = 0,
    seq_len: int | None = None,
    tiny: GPTConfig | None = None,
    names: tuple[str, ...] | list[str] | None = None,
    empty: bool = False,
) -> ModelParts:
    """The model ``spec`` names, as :class:`ModelParts` (see the module docstring for forms).

    Args:
        spec: ``"tiny"``, ``"hf:llama"``, ``"hf:gpt2"`` or ``"py:package.module:attr"``.
        config: ``hf:`` a Hugging Face config (mapping of fields over a tiny default, or a
            config.json path); ``py:`` keyword arguments for the callable (mapping or JSON
            file); not used by ``tiny``.
        seed: weights come from this seed (the same model on every rank).
        seq_len: tokens per sequence; None for the model's default.
        tiny: the tiny GPT's sizes (``tiny`` only).
        names: ``py:`` modules only: the submodules in the order they run.
        empty: ``hf:`` models are built with their parameters on the meta device, to be
            filled per rank by ``parts.materialize`` (others are built whole regardless).

    Raises:
        ConfigError: an unknown form, options that do not apply to it, a ``py:`` target that
            cannot be imported or returns something else, and the errors of ``hf_parts`` and
            ``split_by_names``.

    Example:
        >>> resolve_model("tiny", tiny=GPTConfig(layers=2)).name
        'tiny-gpt'
    """
    if names and not spec.startswith("py:"):
        raise ConfigError(
            f"split names {list(names)} apply to py: models only, not {spec!r}: drop --split"
        )
    if spec == "tiny":
        if config is not None:
            raise ConfigError("--model tiny takes no --model-config: its sizes are its options")
        cfg = tiny or GPTConfig()
        if seq_len is not None:
            cfg = replace(cfg, seq_len=seq_len)
        return tiny_gpt_parts(cfg, seed=seed)
    if spec.startswith("hf:"):
        from stagewise.runtime.models.hf_models import hf_parts

        return hf_parts(spec[3:], config, seed=seed, seq_len=seq_len, empty=empty)
    if spec.startswith("py:"):
        return _python_model(spec, config, seed, seq_len, names)
    from stagewise.runtime.models.hf_folder import folder_parts

    if config is not None:
        raise ConfigError(f"a model folder ({spec!r}) takes no --model-config: it has its own "
                          "config.json")
    return folder_parts(spec, seq_len=seq_len, seed=seed, empty=empty)


def _target(spec: str) -> Any:
    """The object ``py:package.module:attr`` names."""
    path, _, attr = spec[3:].partition(":")
    if not path or not attr:
        raise ConfigError(
            f"model {spec!r} must be py:package.module:attr (a module path, a colon, a name)"
        )
    try:
        module = importlib.import_module(path)
    except ImportError as err:
        raise ConfigError(
            f"cannot import {path!r} for model {spec!r} ({err}): install it or put it on "
            "PYTHONPATH"
        ) from None
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"module {path!r} has no {attr!r} (model {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{spec!r} is a {type(target).__name__}, not a callable")
    return target


def _kwargs(config: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    if config is None or isinstance(config, Mapping):
        return dict(config or {})
    path = Path(config)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read model config {str(path)!r} as JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model config {str(path)!r} must hold a JSON object of fields")
    return data


def _python_model(
    spec: str,
    config: Mapping[str, Any] | str | Path | None,
    seed: int,
    seq_len: int | None,
    names: tuple[str, ...] | list[str] | None,
) -> ModelParts:
    factory = _target(spec)
    kwargs = _kwargs(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            made = factory(**kwargs)
        except TypeError as err:
            raise ConfigError(f"calling {spec!r} with {kwargs} failed: {err}") from None
    if isinstance(made, ModelParts):
        if names:
            raise ConfigError(f"{spec!r} returned ModelParts, already split: drop --split")
        return made
    if not isinstance(made, nn.Module):
        raise ConfigError(
            f"{spec!r} returned {type(made).__name__}: return an nn.Module or ModelParts"
        )
    if not names:
        raise ConfigError(
            f"{spec!r} returned an nn.Module: name its submodules in the order they run, "
            "e.g. --split embed,blocks,head"
        )
    return _split_lm(spec, made, names, seq_len or DEFAULT_SEQ_LEN)


def _split_lm(spec: str, module: nn.Module, names: Any, seq_len: int) -> ModelParts:
    """``module`` as a causal LM over the tiny GPT's data (see the module docstring)."""
    from stagewise.runtime.models.split_module import split_by_names
    from stagewise.runtime.models.tiny_gpt import lm_loss, make_batch

    embedding = next((m for m in module.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is None:
        raise ConfigError(
            f"{spec!r}: an nn.Module is trained as a language model and needs an nn.Embedding "
            "for its vocabulary; for other models return ModelParts (layers, loss, data)"
        )
    data = GPTConfig(vocab=embedding.num_embeddings, seq_len=seq_len)

    def batch(rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return make_batch(data, rows, generator)

    sample, _ = batch(2, torch.Generator().manual_seed(0))
    return split_by_names(
        module, list(names), loss_fn=lm_loss, make_batch=batch, seq_len=seq_len, sample=sample,
        name=spec,
    )
