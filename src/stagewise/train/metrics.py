"""Training metrics: per-step scalars as JSON lines and TensorBoard event files, model FLOPs
utilisation (MFU) from the planner's FLOP model, and peak memory per rank.

One writer per run (on the rank that holds the loss)::

    with MetricsWriter("metrics.jsonl", "runs/tb") as metrics:
        metrics.write(step, loss=loss, lr=lr, grad_norm=norm, tokens_per_s=rate,
                      mfu=mfu(rate, per_token, peak), memory_bytes=peak_memory_bytes(device))

MFU divides the model FLOPs of the tokens trained per second (Korthikanti et al. 2022, see
``stagewise.plan.flops``) by the peak of the devices that trained them (dense BF16 tensor-core
peaks from the planner's GPU catalog, the usual MFU convention, whatever dtype the run uses).
On CPU there is no such peak: MFU is None unless a peak is given.
"""

from __future__ import annotations

import json
import math
import re
import resource
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from stagewise.errors import ConfigError, PlanError
from stagewise.plan.flops import model_flops_per_token
from stagewise.plan.hardware import catalog_gpus, get_gpu
from stagewise.plan.models import ModelSpec, model_from_hf_config

__all__ = [
    "MetricsWriter",
    "flops_per_token",
    "gpu_catalog_name",
    "gpu_peak_flops",
    "mfu",
    "peak_memory_bytes",
    "require_tensorboard",
    "state_bytes",
    "tiny_gpt_spec",
]

INSTALL_TENSORBOARD = "pip install tensorboard"


def require_tensorboard() -> None:
    """Check that TensorBoard event files can be written (call before launch).

    Raises:
        ConfigError: ``tensorboard`` is not installed; the message names the install.
    """
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"--tensorboard needs the tensorboard package ({err}): {INSTALL_TENSORBOARD}, "
            "or leave --tensorboard out (JSON lines need nothing)"
        ) from None


class MetricsWriter:
    """Per-step scalars to a JSON-lines file and/or a TensorBoard event folder.

    Args:
        jsonl_path: a file to write one JSON object per :meth:`write` to (``{"step": 3,
            "loss": 2.1, ...}``), created with its folder; None for none.
        tensorboard_dir: a folder for TensorBoard event files (``torch.utils.tensorboard``,
            each scalar under its own name); None for none.

    Raises:
        ConfigError: as :func:`require_tensorboard`, or a path cannot be written.
    """

    def __init__(self, jsonl_path: str | None, tensorboard_dir: str | None) -> None:
        self._lines: IO[str] | None = None
        self._board: Any = None
        if tensorboard_dir is not None:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(log_dir=tensorboard_dir)
        if jsonl_path is not None:
            try:
                Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
                self._lines = open(jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as err:
                self.close()
                raise ConfigError(
                    f"cannot write metrics to {jsonl_path!r}: {err}; give a writable path"
                ) from None

    def write(self, step: int, **scalars: float | int | None) -> None:
        """Record ``scalars`` for ``step``; None values (no MFU on CPU) are left out.

        Raises:
            ConfigError: a value that is not a number.
        """
        values: dict[str, float | int] = {}
        for name, value in scalars.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"metric {name!r} = {value!r} is not a number")
            values[name] = value
        if self._lines is not None:
            record = {"step": step, **{k: _json_number(v) for k, v in values.items()}}
            self._lines.write(json.dumps(record) + "\n")
            self._lines.flush()
        if self._board is not None:
            for name, value in values.items():
                self._board.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        """Flush and close the files (safe to call twice)."""
        if self._lines is not None:
            self._lines.close()
            self._lines = None
        if self._board is not None:
            self._board.close()
            self._board = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


def _json_number(value: float | int) -> float | int | str | None:
    """A value JSON can hold: non-finite floats as the strings ``"nan"``, ``"inf"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def tiny_gpt_spec(*, layers: int, dim: int, heads: int, vocab: int, seq_len: int) -> ModelSpec:
    """The tiny GPT (``stagewise.runtime.models.tiny_gpt``) as the planner's ``ModelSpec``:
    GELU MLP of 4x width, LayerNorm, learned positions, biases, untied head."""
    return ModelSpec(
        name="tiny-gpt", layers=layers, hidden=dim, heads=heads, kv_heads=heads,
        ffn=4 * dim, vocab=vocab, mlp="gelu", norm="layernorm", position="learned",
        bias=True, max_seq_len=seq_len, source="stagewise tiny GPT",
    )


def flops_per_token(
    model: ModelSpec | Mapping[str, Any], seq_len: int, *, lora: bool = False
) -> float:
    """Model FLOPs of one trained token (forward and backward), the planner's count.

    Args:
        model: a ``ModelSpec`` (:func:`tiny_gpt_spec`, ``plan.models.get_model``) or a Hugging
            Face config as a dict (``config.to_dict()``; llama, mistral or gpt2).
        seq_len: tokens per sequence.
        lora: LoRA fine-tuning (no weight gradients of the frozen base: 2x forward, not 3x).

    Raises:
        ConfigError: an unsupported Hugging Face config (then MFU cannot be computed).

    Example:
        >>> spec = tiny_gpt_spec(layers=1, dim=64, heads=1, vocab=100, seq_len=32)
        >>> round(flops_per_token(spec, 32) / (72 * 64**2 * (1 + 32 / 384 + 100 / 768)), 9)
        1.0
    """
    if not isinstance(model, ModelSpec):
        try:
            model = model_from_hf_config(dict(model))
        except PlanError as err:
            raise ConfigError(f"no FLOP count for MFU: {err}") from None
    return model_flops_per_token(model, seq_len, "lora" if lora else "full")


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: ``tokens_per_s * flops_per_token / peak_flops``.

    ``peak_flops`` is the peak of every device that trained those tokens together (one GPU's
    peak times the world size for a whole run's tokens/s). None when there is no peak (CPU).

    Example:
        >>> mfu(1000.0, 6e9, 1e13)
        0.6
    """
    if peak_flops is None:
        return None
    if not peak_flops > 0:
        raise ConfigError(f"peak FLOP/s {peak_flops} must be positive")
    return tokens_per_s * flops_per_token / peak_flops


def gpu_peak_flops(device_name: str) -> float | None:
    """One GPU's dense BF16 peak FLOP/s from the planner's catalog, by the name CUDA reports
    (``torch.cuda.get_device_name()``: ``"NVIDIA H100 80GB HBM3"``); None when unknown.

    The longest run of the name's words that is a catalog name or alias wins
    (``a100-sxm4-40gb`` before ``a100``). The catalog's figures are the SXM parts'.

    Example:
        >>> gpu_peak_flops("NVIDIA H100 80GB HBM3")
        989400000000000.0
        >>> gpu_peak_flops("cpu") is None
        True
    """
    name = gpu_catalog_name(device_name)
    return None if name is None else get_gpu(name).peak_flops


def gpu_catalog_name(device_name: str) -> str | None:
    """The planner's catalog name of the GPU CUDA calls ``device_name`` (``"NVIDIA H100 80GB
    HBM3"`` -> ``"H100-SXM5-80GB"``), for ``stagewise plan --gpu``; None when unknown.

    Example:
        >>> gpu_catalog_name("NVIDIA H100 80GB HBM3")
        'H100-SXM5-80GB'
    """
    tokens = [t for t in re.split(r"[\s_-]+", device_name.strip().lower()) if t]
    real = set(catalog_gpus())
    for width in range(len(tokens), 0, -1):
        for first in range(len(tokens) - width + 1):
            try:
                gpu = get_gpu("-".join(tokens[first : first + width]))
            except PlanError:
                continue
            if gpu.name in real:
                return gpu.name
    return None


def state_bytes(parameters: Iterable[Any], optimizer: Any) -> dict[str, int]:
    """The bytes of one rank's model states, counted on its tensors: ``weights`` (every
    parameter, frozen ones included, FSDP shards as held locally), ``trainable`` (the part the
    optimizer updates), ``gradients`` (one per trainable parameter, in its dtype) and
    ``optimizer`` (every tensor in the optimizer's state: AdamW's two moments and step).

    Example:
        >>> import torch
        >>> frozen, adapter = torch.zeros(10), torch.nn.Parameter(torch.zeros(3))
        >>> state_bytes([frozen.requires_grad_(False), adapter], torch.optim.AdamW([adapter]))
        {'weights': 52, 'trainable': 12, 'gradients': 12, 'optimizer': 0}
    """
    seen: dict[int, Any] = {}
    for param in parameters:
        seen.setdefault(id(param), param)

    def size(tensor: Any) -> int:
        local = getattr(tensor, "_local_tensor", tensor)  # a DTensor's shard on this rank
        return int(local.numel() * local.element_size())

    trainable = sum(size(p) for p in seen.values() if p.requires_grad)
    moments = sum(size(value) for state in optimizer.state.values() for value in state.values()
                  if hasattr(value, "element_size"))
    return {"weights": sum(size(p) for p in seen.values()), "trainable": trainable,
            "gradients": trainable, "optimizer": moments}


def peak_memory_bytes(device: str = "cpu") -> int:
    """This process's peak memory: ``torch.cuda.max_memory_allocated()`` on ``"cuda"``, the
    process's maximum resident set size on ``"cpu"`` (all of the process, not only tensors)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB
