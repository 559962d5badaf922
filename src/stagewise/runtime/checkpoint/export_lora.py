"""A LoRA checkpoint back out as a peft adapter folder, or merged into Hugging Face weights.

A LoRA run saves the adapters alone (``runtime.models.lora.adapter_layers``), keyed by model
layer as every checkpoint is. :func:`save_lora_spec` records the spec and the base model's
folder as ``CHECKPOINT_DIR/lora.json``; :func:`export_lora` reads it and writes either

- a peft adapter folder (``adapter_config.json``, ``adapter_model.safetensors`` with peft's
  keys, ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), which
  ``PeftModel.from_pretrained(base, OUT)`` loads: the whole model is built empty and wrapped by
  ``peft.get_peft_model``, whose layers hold the adapters under the names the run gave them;
  only the adapters get memory; or
- with ``merge``, the base model (read from its folder) with ``W + (alpha / r) B A`` merged in by
  peft's ``merge_and_unload``, as a Hugging Face folder ``from_pretrained`` loads.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagewise.errors import ConfigError
from stagewise.lora_spec import LoraSpec
from stagewise.runtime.checkpoint.export import (
    DTYPES,
    Export,
    _check_out,
    _checkpoint_root,
    _replace,
    _write,
    check_dtype,
    complete_step,
    model_files,
    summary,
)

__all__ = ["LORA_FILE", "LoraRecord", "export_lora", "read_lora_spec", "save_lora_spec"]

LORA_FILE = "lora.json"
_NOT_COPIED = ("config.json", "generation_config.json")
_STAMPS = ("transformers_version", "torch_dtype", "dtype", "architectures")


@dataclass(frozen=True)
class LoraRecord:
    """What a LoRA run recorded beside its checkpoints.

    Attributes:
        spec: the adapters trained.
        base_model: the Hugging Face folder of the frozen base (for ``--merge``).
    """

    spec: LoraSpec
    base_model: Path


def save_lora_spec(
    step_or_checkpoint_dir: str | os.PathLike[str], spec: LoraSpec,
    base_model: str | os.PathLike[str],
) -> Path:
    """Record a LoRA run's spec and base folder as ``CHECKPOINT_DIR/lora.json``; one rank.

    Args:
        step_or_checkpoint_dir: the checkpoint folder, or one of its step folders.
        spec: the run's adapters.
        base_model: the model folder the run started from (saved as an absolute path).

    Returns:
        The file written.
    """
    root = _checkpoint_root(Path(step_or_checkpoint_dir))
    root.mkdir(parents=True, exist_ok=True)
    target = root / LORA_FILE
    partial = target.with_name(target.name + ".partial")
    record = {"lora": spec.to_dict(), "base_model": str(Path(base_model).resolve())}
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(target)
    return target


def read_lora_spec(checkpoint: str | os.PathLike[str]) -> LoraRecord | None:
    """The record of :func:`save_lora_spec` for a checkpoint or step folder; None when the
    checkpoint is not a LoRA run's.

    Raises:
        ConfigError: the file is there but unreadable.
    """
    where = Path(checkpoint)
    for path in (where / LORA_FILE, _checkpoint_root(where) / LORA_FILE):
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                return LoraRecord(LoraSpec.from_dict(data["lora"]), Path(data["base_model"]))
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ConfigError(
                    f"{str(path)!r} is not a LoRA record ({err}): it should hold "
                    '{"lora": {"r": ..., "targets": [...]}, "base_model": FOLDER}'
                ) from None
    return None


def export_lora(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    merge: bool = False,
    base_model: str | os.PathLike[str] | None = None,
    force: bool = False,
    max_shard_size: int | str = "2GB",
    dtype: str = "float32",
) -> Export:
    """Write a LoRA checkpoint as a peft adapter folder, or (``merge``) merged HF weights.

    Args:
        checkpoint: a complete step folder, or a checkpoint folder (its newest complete step).
        out_dir: the folder to write (written beside it first, then moved in).
        merge: write the base with the adapters merged in, not the adapter folder.
        base_model: the base model's folder; None for the one the run recorded.
        force: replace an adapter or model folder already at ``out_dir``.
        max_shard_size: the largest safetensors shard of a merged model.
        dtype: ``float32``, ``bfloat16`` or ``float16`` of the written tensors.

    Raises:
        ConfigError: not a LoRA checkpoint, no such checkpoint, no model files, a base folder
            missing or of another model, ``out_dir`` not empty (without ``force``), an unknown
            ``dtype``.

    Example:
        >>> export_lora("ckpt", "adapter")  # doctest: +SKIP
        Export(checkpoint=PosixPath('ckpt/step-00000100'), step=100, ...)
    """
    check_dtype(dtype)
    step = complete_step(checkpoint)
    record = read_lora_spec(step)
    if record is None:
        raise ConfigError(
            f"checkpoint {str(step)!r} is not a LoRA run's (no {LORA_FILE} beside it): export "
            "it without --merge, as a whole model"
        )
    files = model_files(step)
    base = Path(base_model) if base_model is not None else record.base_model
    out = Path(out_dir)
    if merge:
        _check_out(out, force)
        model = _merged(step, files, record.spec, base)
        written: list[torch.Tensor] = list(model.to(DTYPES[dtype]).parameters())
        _write(model, files, out, max_shard_size)
    else:
        _check_adapter_out(out, force)
        written = _write_adapter(step, files, record.spec, base, out, DTYPES[dtype])
    return summary(step, out, written)


def _peft_model(model: nn.Module, spec: LoraSpec, step: Path) -> Any:
    """``model`` wrapped by ``peft.get_peft_model`` and its adapters read from ``step``."""
    from stagewise.runtime.checkpoint.state import load_checkpoint
    from stagewise.runtime.models.hf_models import hf_layers
    from stagewise.runtime.models.lora import _peft, adapter_layers, peft_config

    wrapped = _peft().get_peft_model(model, peft_config(spec, model))
    layers, _ = hf_layers(wrapped.base_model.model)
    views = adapter_layers(dict(enumerate(layers)))
    for view in views.values():
        for owner in view.modules():
            for key, param in owner._parameters.items():
                if param is not None and param.device.type == "meta":
                    owner._parameters[key] = nn.Parameter(torch.zeros(param.shape))
    load_checkpoint(step, views)
    return wrapped


def _write_adapter(step: Path, files: Path, spec: LoraSpec, base: Path, out: Path,
                   dtype: torch.dtype) -> list[torch.Tensor]:
    """The peft adapter folder of ``step`` into ``out``; returns the tensors written."""
    from stagewise.runtime.models.hf_folder import build_folder_model, read_model_config
    from stagewise.runtime.models.lora import ADAPTER

    wrapped = _peft_model(build_folder_model(files, read_model_config(files)), spec, step)
    adapters = [p for n, p in wrapped.named_parameters() if f".{ADAPTER}." in n]
    for param in adapters:
        param.data = param.data.to(dtype)
    wrapped.peft_config[ADAPTER].base_model_name_or_path = str(base)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    wrapped.save_pretrained(partial)
    for file in sorted(files.iterdir()):  # the tokenizer, so OUT is a complete fine-tune
        if file.is_file() and file.name not in _NOT_COPIED and not (partial / file.name).exists():
            shutil.copy2(file, partial / file.name)
    _replace(partial, out)
    return adapters


def _merged(step: Path, files: Path, spec: LoraSpec, base: Path) -> nn.Module:
    """The base model read from ``base`` with ``step``'s adapters merged in (float32)."""
    from stagewise.runtime.models.hf_folder import (
        build_folder_model,
        check_model_folder,
        match_weights,
        read_model_config,
    )
    from stagewise.runtime.models.hf_models import hf_layers

    if not base.is_dir():
        raise ConfigError(
            f"--merge needs the base model the adapters were trained on, but {str(base)!r} is "
            "not a folder: pass --base FOLDER (the model folder the run started from)"
        )
    info = check_model_folder(base)
    if not _same_model(info.config, read_model_config(files)):
        raise ConfigError(
            f"base model {str(base)!r} is not the model of checkpoint {str(step)!r} (their "
            "config.json differ): pass --base with the folder the run started from"
        )
    model = build_folder_model(info.path, info.config)
    layers, _ = hf_layers(model)
    match_weights(info, model)(layers)
    wrapped = _peft_model(model, spec, step)
    merged: nn.Module = wrapped.merge_and_unload()
    return merged


def _check_adapter_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} is a file: pass a new or empty folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held or (force and "adapter_config.json" in held):
        return
    if force:
        raise ConfigError(
            f"output folder {str(out)!r} holds files but no peft adapter ({', '.join(held[:3])}); "
            "--force replaces only an adapter folder: pass a new or empty folder"
        )
    raise ConfigError(
        f"output folder {str(out)!r} is not empty ({', '.join(held[:3])}): pass a new or empty "
        "folder, or --force to replace the adapter folder there"
    )


def _same_model(one: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether two config.json describe the same model (what save_pretrained stamps aside)."""
    def shape(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if not k.startswith("_") and k not in _STAMPS}

    return shape(one) == shape(other)
