"""LoRA fine-tuning through ``peft``: adapters on a pipeline layer's Linears, the base frozen.

A rank fills its layers one by one (``parts.materialize([layer])``); :func:`apply_lora` then
injects ``peft``'s LoRA layers into the layer's target Linears (``peft.inject_adapter_in_model``,
so the forward is peft's own) and freezes every base parameter. Only the adapters train: give
the optimizer :func:`trainable_parameters`, and save and load checkpoints of
:func:`adapter_layers` (the adapters alone, keyed by model layer like any checkpoint).

The adapters' first values do not depend on the layout: A is drawn as peft draws it (Kaiming
uniform) but from a generator seeded by the run's seed and the parameter's name in the model
(layer index and name inside the layer), and B is zero, so the first output is the base
model's. Adapters stay float32 whatever the base's dtype. Names inside a layer are peft's
(``block.self_attn.q_proj.lora_A.default.weight``): the names ``peft.get_peft_model`` gives the
whole model, which is how ``export_lora`` maps a checkpoint back to a peft adapter folder.

Example:
    >>> from stagewise.lora_spec import LoraSpec
    >>> layer = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    >>> apply_lora(layer, LoraSpec(r=2, targets=("0",)), seed=0, index=3)
    1
    >>> [name for name, p in layer.named_parameters() if p.requires_grad]
    ['0.lora_A.default.weight', '0.lora_B.default.weight']
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from stagewise.errors import ConfigError
from stagewise.lora_spec import LoraSpec
from stagewise.runtime.models.lazy_init import _key
from stagewise.runtime.models.model_parts import ModelParts

__all__ = [
    "ADAPTER",
    "LoraSpec",
    "adapter_layers",
    "apply_lora",
    "cast_frozen",
    "check_lora_mesh",
    "check_lora_targets",
    "linear_names",
    "peft_config",
    "trainable_parameters",
]

ADAPTER = "default"  # peft's adapter name; peft drops it from the keys of a saved adapter


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA needs the peft package: pip install peft") from None
    return peft


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2's transposed Linear), which peft adapts too."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _modules(parts_or_model: ModelParts | nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    if isinstance(parts_or_model, ModelParts):
        return list(parts_or_model.layers)
    if isinstance(parts_or_model, nn.Module):
        return [parts_or_model]
    return list(parts_or_model)


def linear_names(parts_or_model: ModelParts | nn.Module | Iterable[nn.Module]) -> list[str]:
    """The names LoRA may target: the last part of every Linear module's name, in model order,
    each once, leaving out Linears whose weight is tied to another module (GPT-2's lm_head).

    Example:
        >>> linear_names(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
        ['0', '1']
    """
    modules = _modules(parts_or_model)
    uses: dict[int, int] = {}
    for module in modules:
        # A tied Parameter is held twice: by two layers, or twice inside one model.
        for _, param in module.named_parameters(remove_duplicate=False):
            uses[id(param)] = uses.get(id(param), 0) + 1
    names: dict[str, None] = {}
    for module in modules:
        for name, child in module.named_modules():
            weight = getattr(child, "weight", None)
            if _is_linear(child) and name and uses.get(id(weight), 0) <= 1:
                names.setdefault(name.rsplit(".", 1)[-1], None)
    return list(names)


def check_lora_targets(
    parts_or_model: ModelParts | nn.Module | Iterable[nn.Module], spec: LoraSpec
) -> list[str]:
    """Check before launch that the model has a Linear module of every target name.

    The parameters may still be on the meta device (an empty build).

    Returns:
        The Linear names the model has (:func:`linear_names`).

    Raises:
        ConfigError: a target the model does not have, naming the ones it has.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> check_lora_targets(net, LoraSpec(targets=("q_proj",)))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        stagewise.errors.ConfigError: --lora targets q_proj: the model has no Linear module ...
    """
    have = linear_names(parts_or_model)
    missing = [name for name in spec.targets if name not in have]
    if missing:
        example = ",".join(have[:2])
        raise ConfigError(
            f"--lora targets {', '.join(missing)}: the model has no Linear module of that name; "
            f"it has {', '.join(have) or 'none'}: pick targets among them, e.g. targets={example}"
        )
    return have


def check_lora_mesh(tp: int) -> None:
    """Refuse LoRA with tensor parallelism (the adapters are not sharded consistently yet).

    Raises:
        ConfigError: ``tp > 1``.
    """
    if tp > 1:
        raise ConfigError(
            f"--lora with tp={tp} is not supported: the adapters are not sharded over tensor-"
            "parallel ranks; use --tp 1 (pp and dp work with LoRA)"
        )


def peft_config(spec: LoraSpec, model: nn.Module, targets: Iterable[str] | None = None) -> Any:
    """``peft.LoraConfig`` of ``spec`` for ``model`` (only ``targets`` when given); GPT-2's
    transposed Conv1D targets set ``fan_in_fan_out`` as peft wants."""
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    names = list(spec.targets if targets is None else targets)
    transposed = any(
        type(child).__name__ == "Conv1D" and name.rsplit(".", 1)[-1] in names
        for name, child in model.named_modules()
    )
    return _peft().LoraConfig(
        r=spec.r, lora_alpha=alpha, lora_dropout=spec.dropout, target_modules=names,
        bias="none", fan_in_fan_out=transposed,
    )


def apply_lora(layer: nn.Module, spec: LoraSpec, *, seed: int, index: int) -> int:
    """Add peft LoRA adapters to the target Linears inside one pipeline layer, in place.

    Call it on a filled layer (after ``parts.materialize([layer])``), before moving it to a
    device, sharding it, or building the optimizer. Every parameter the layer had is frozen
    (``requires_grad`` False), also in a layer without targets; the adapters are float32.

    Args:
        layer: one layer of ``ModelParts.layers``.
        spec: what to add.
        seed: the run's seed; with ``index`` and the name, it fixes the adapters' first values.
        index: the layer's index in the whole model (not in its stage).

    Returns:
        How many modules got adapters (0 for a layer without targets, e.g. the embedding).

    Raises:
        ConfigError: peft is not installed.
    """
    layer.requires_grad_(False)
    found = sorted({
        name.rsplit(".", 1)[-1] for name, child in layer.named_modules()
        if _is_linear(child) and name.rsplit(".", 1)[-1] in spec.targets
    })
    if not found:
        return 0
    peft = _peft()
    with torch.random.fork_rng(devices=[]):  # peft draws A from the global generator
        config = peft_config(spec, layer, found)
        peft.inject_adapter_in_model(config, layer, adapter_name=ADAPTER)
    adapted = _lora_modules(layer)
    for name, module in adapted.items():
        for part in ("lora_A", "lora_B"):
            getattr(module, part)[ADAPTER].float()
        _draw(module, seed, f"{index}.{name}" if name else str(index))
    return len(adapted)


def _lora_modules(layer: nn.Module) -> dict[str, Any]:
    """Name inside ``layer`` -> every peft LoRA layer inside it holding the adapter."""
    lora_layer = _peft().tuners.lora.LoraLayer
    return {
        name: module for name, module in layer.named_modules()
        if isinstance(module, lora_layer) and ADAPTER in module.lora_A
    }


@torch.no_grad()
def _draw(module: Any, seed: int, name: str) -> None:
    """A as peft draws it (Kaiming uniform, a = sqrt(5)) from ``(seed, name)``; B zero."""
    weight_a: torch.Tensor = module.lora_A[ADAPTER].weight
    weight_b: torch.Tensor = module.lora_B[ADAPTER].weight
    if weight_a.device.type == "meta":
        return
    generator = torch.Generator().manual_seed(_key(seed, f"{name}.lora_A"))
    value = torch.empty(weight_a.shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
    weight_a.copy_(value)
    weight_b.zero_()


@torch.no_grad()
def cast_frozen(layer: nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen parameters of ``layer`` (the base under LoRA) to ``dtype``, in place;
    the trainable ones (the adapters) stay as they are. Frozen weights need no fp32 master
    copy, so a bf16 run holds its base in half the bytes. Returns the parameters cast.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> _ = net.weight.requires_grad_(False)
        >>> cast_frozen(net, torch.bfloat16), net.weight.dtype, net.bias.dtype
        (1, torch.bfloat16, torch.float32)
    """
    cast = 0
    for param in layer.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def trainable_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The parameters that require a gradient, each once: what the optimizer should hold.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> _ = net.bias.requires_grad_(False)
        >>> [tuple(p.shape) for p in trainable_parameters([net])]
        [(2, 2)]
    """
    found: dict[int, nn.Parameter] = {}
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                found.setdefault(id(param), param)
    return list(found.values())


def adapter_layers(layers: Mapping[int, nn.Module]) -> dict[int, nn.Module]:
    """This rank's layers as adapter-only modules, for adapter-only checkpoints.

    Each view holds the layer's ``lora_A`` and ``lora_B`` modules (the same objects, so the
    same Parameters) under the names they have in the layer, and nothing else; a layer without
    adapters gives an empty view. Pass the result where ``save_checkpoint`` and
    ``load_checkpoint`` take ``layers``: the checkpoint then holds the adapters and their
    optimizer state (``model.3.block.self_attn.q_proj.lora_A.default.weight``), not the base.

    Args:
        layers: ``rank_layers(stages, sizes)`` of layers that :func:`apply_lora` adapted.

    Example:
        >>> layer = nn.Sequential(nn.Linear(4, 4))
        >>> _ = apply_lora(layer, LoraSpec(r=2, targets=("0",)), seed=0, index=0)
        >>> list(adapter_layers({5: layer})[5].state_dict())
        ['0.lora_A.default.weight', '0.lora_B.default.weight']
    """
    return {index: _adapter_view(layer) for index, layer in layers.items()}


def _adapter_view(layer: nn.Module) -> nn.Module:
    view = nn.Module()
    for name, module in _lora_modules(layer).items():
        holder = view
        for part in name.split(".") if name else ():
            child = holder._modules.get(part)
            if child is None:
                child = nn.Module()
                holder.add_module(part, child)
            holder = child
        holder.add_module("lora_A", module.lora_A)
        holder.add_module("lora_B", module.lora_B)
    return view
