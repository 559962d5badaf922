"""A checkpoint back out as a Hugging Face model folder: ``stagewise export CKPT OUT_DIR``.

A checkpoint names every tensor by model layer (``state``), whatever layout wrote it (pp, tp,
dp, fsdp), so one process can load it into the whole model's layers and write the folder
Hugging Face reads: ``config.json``, sharded safetensors with ``model.safetensors.index.json``,
and the tokenizer. For that the checkpoint must know its model: :func:`save_model_files`
copies the model folder's config and tokenizer into ``CHECKPOINT_DIR/model/`` when training
starts, and :func:`export_checkpoint` reads them from there.

The whole model is held in memory once (float32) while exporting.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagewise.errors import ConfigError
from stagewise.runtime.checkpoint.folders import MARKER, checkpoint_step, latest_checkpoint

__all__ = ["MODEL_DIR", "Export", "export_checkpoint", "model_files", "save_model_files"]

MODEL_DIR = "model"
# Files of a model folder that are weights (never copied into a checkpoint).
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_STEP = re.compile(r"^step-\d{8}(\.partial)?$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Export:
    """What :func:`export_checkpoint` wrote.

    Attributes:
        checkpoint: the complete step folder exported.
        step: its step.
        out: the Hugging Face folder written.
        files: the names of the files in ``out``.
        num_tensors: tensors written.
        num_bytes: their bytes.
    """

    checkpoint: Path
    step: int
    out: Path
    files: tuple[str, ...]
    num_tensors: int
    num_bytes: int


def _checkpoint_root(path: Path) -> Path:
    """The checkpoint folder of ``path``: itself, or the parent of a step folder."""
    return path.parent if _STEP.match(path.name) else path


def save_model_files(
    step_or_checkpoint_dir: str | os.PathLike[str], model_folder: str | os.PathLike[str]
) -> Path:
    """Copy a model folder's config, tokenizer and other small files (not its weights) into
    ``CHECKPOINT_DIR/model/``, so the checkpoints can be exported; call on one rank.

    Args:
        step_or_checkpoint_dir: the checkpoint folder (``--checkpoint-dir``), or one of its
            step folders (its parent is used).
        model_folder: the Hugging Face folder the run was started from.

    Returns:
        ``CHECKPOINT_DIR/model``, replaced if it was there.

    Raises:
        ConfigError: ``model_folder`` has no config.json.

    Example:
        >>> save_model_files("ckpt", "./my-llama")  # doctest: +SKIP
        PosixPath('ckpt/model')
    """
    source = Path(model_folder)
    if not (source / "config.json").is_file():
        raise ConfigError(
            f"model folder {str(source)!r} has no config.json: pass the Hugging Face folder "
            "the run trains"
        )
    target = _checkpoint_root(Path(step_or_checkpoint_dir)) / MODEL_DIR
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        if file.is_file() and not file.name.endswith(_WEIGHTS) and file.name not in _INDEXES:
            shutil.copy2(file, partial / file.name)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def model_files(step: str | os.PathLike[str]) -> Path:
    """The folder of model files (config.json, tokenizer) that checkpoint ``step`` belongs to.

    Raises:
        ConfigError: neither ``step/model`` nor ``CHECKPOINT_DIR/model`` holds a config.json.
    """
    where = Path(step)
    for folder in (where / MODEL_DIR, _checkpoint_root(where) / MODEL_DIR):
        if (folder / "config.json").is_file():
            return folder
    root = _checkpoint_root(where)
    raise ConfigError(
        f"checkpoint {str(where)!r} has no model files ({root / MODEL_DIR!s}/config.json): "
        "export needs the model's config and tokenizer; train with --model FOLDER (which "
        f"saves them), or copy config.json and the tokenizer files into {root / MODEL_DIR!s}"
    )


def complete_step(checkpoint: str | os.PathLike[str]) -> Path:
    """``checkpoint`` if it is a complete step folder, else its newest complete step.

    Raises:
        ConfigError: the path does not exist, or holds no complete checkpoint.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise ConfigError(
            f"checkpoint {str(path)!r} does not exist: pass a checkpoint folder (train's "
            "--checkpoint-dir) or one of its step-NNNNNNNN folders"
        )
    found = latest_checkpoint(path)
    if found is not None:
        return found
    if _STEP.match(path.name):
        raise ConfigError(
            f"{str(path)!r} is not a complete checkpoint (no valid {MARKER} marker: its save "
            "was cut short): pass its checkpoint folder to take the newest complete step"
        )
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    what = f"it holds {', '.join(held[:5])}" if held else "it is empty"
    raise ConfigError(
        f"no complete checkpoint in {str(path)!r} ({what}): pass the --checkpoint-dir of a run "
        "that saved one (--save-every), or a step-NNNNNNNN folder"
    )


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} is a file: pass a new or empty folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held:
        return
    if not force:
        raise ConfigError(
            f"output folder {str(out)!r} is not empty ({', '.join(held[:3])}): pass a new or "
            "empty folder, or --force to replace the model folder there"
        )
    if "config.json" not in held:
        raise ConfigError(
            f"output folder {str(out)!r} holds files but no model ({', '.join(held[:3])}); "
            "--force replaces only a Hugging Face model folder: pass a new or empty folder"
        )


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    max_shard_size: int | str = "2GB",
    dtype: str = "float32",
) -> Export:
    """Write a checkpoint's model as a Hugging Face folder ``out_dir``.

    Args:
        checkpoint: a complete step folder, or a checkpoint folder (its newest complete step).
        out_dir: the folder to write (created; written beside it first, then moved in).
        force: replace a Hugging Face model folder already at ``out_dir``.
        max_shard_size: the largest safetensors shard (bytes, or e.g. ``"2GB"``).
        dtype: ``float32`` (as trained), ``bfloat16`` or ``float16``.

    Returns:
        What was written (:class:`Export`).

    Raises:
        ConfigError: no such checkpoint or none complete, no model files beside it, a
            checkpoint of another model, ``out_dir`` not empty (without ``force``), an
            unknown ``dtype``.

    Example:
        >>> export_checkpoint("ckpt", "exported")  # doctest: +SKIP
        Export(checkpoint=PosixPath('ckpt/step-00000100'), step=100, ...)
    """
    from stagewise.runtime.checkpoint.state import load_checkpoint
    from stagewise.runtime.models.hf_folder import build_folder_model, read_model_config
    from stagewise.runtime.models.hf_models import hf_layers

    check_dtype(dtype)
    step = complete_step(checkpoint)
    files = model_files(step)
    out = Path(out_dir)
    _check_out(out, force)
    model = build_folder_model(files, read_model_config(files))
    layers, _ = hf_layers(model)
    _allocate(model)
    load_checkpoint(step, dict(enumerate(layers)))
    model = model.to(DTYPES[dtype])
    _write(model, files, out, max_shard_size)
    return summary(step, out, model.parameters())


def check_dtype(dtype: str) -> None:
    """Raise ConfigError unless ``dtype`` is one an export writes."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def summary(step: Path, out: Path, tensors: Iterable[torch.Tensor]) -> Export:
    """What an export of checkpoint ``step`` wrote into ``out`` (each tensor counted once)."""
    unique = list({id(t): t for t in tensors}.values())
    return Export(
        checkpoint=step, step=checkpoint_step(step), out=out,
        files=tuple(sorted(p.name for p in out.iterdir())), num_tensors=len(unique),
        num_bytes=sum(t.numel() * t.element_size() for t in unique),
    )


def _write(model: Any, files: Path, out: Path, max_shard_size: int | str) -> None:
    """``model`` by ``save_pretrained`` and the model files but config.json (the tokenizer,
    generation config...) into a folder beside ``out``, then moved to ``out``."""
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size=max_shard_size)
    for file in sorted(files.iterdir()):
        if file.is_file() and file.name != "config.json":
            shutil.copy2(file, partial / file.name)
    _replace(partial, out)


def _allocate(model: nn.Module) -> None:
    """Give every meta parameter of ``model`` zeroed CPU memory (a tie stays one Parameter)."""
    real: dict[int, nn.Parameter] = {}
    for owner in model.modules():
        for key, param in owner._parameters.items():
            if param is not None and param.device.type == "meta":
                if id(param) not in real:
                    real[id(param)] = nn.Parameter(torch.zeros(param.shape, dtype=param.dtype))
                owner._parameters[key] = real[id(param)]


def _replace(partial: Path, out: Path) -> None:
    """Move the written folder ``partial`` to ``out`` (an old one is removed after)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    partial.rename(out)
    shutil.rmtree(old, ignore_errors=True)
