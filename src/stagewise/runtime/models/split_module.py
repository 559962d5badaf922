"""A user's own ``nn.Module`` cut into pipeline layers by the names of its submodules.

``split_by_names(model, ["embed", "blocks", "head"], ...)`` makes each named submodule one
layer, in the order given; a name that points at an ``nn.ModuleList`` stands for each of its
children in order (``"blocks"`` is ``"blocks.0", "blocks.1", ...``), since a ModuleList cannot
run by itself. The cut is only right when the model's forward is exactly that chain, each
submodule fed the previous one's single output, so two checks come with it:

- coverage: every parameter of the model belongs to exactly one named submodule (the error
  lists the parameters left out and those named twice, e.g. ``"blocks"`` beside
  ``"blocks.0"``);
- the chain, when a sample input is given: running the submodules in order gives what the model
  gives (same random state for both, so dropout draws alike).

One Parameter object reached under two names in two different layers (tied weights, e.g. an
input embedding reused as the output projection) becomes a tie of ``ModelParts``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from stagewise.errors import ConfigError
from stagewise.runtime.models.model_parts import BatchFn, LossFn, ModelParts

__all__ = ["expand_names", "split_by_names"]


def expand_names(module: nn.Module, names: Sequence[str]) -> list[str]:
    """``names`` with each ``nn.ModuleList`` replaced by its children's names, in order.

    Raises:
        ConfigError: no names, or a name that is not a submodule of ``module``.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.ReLU(), nn.ReLU()]))
        >>> expand_names(model, ["0", "1"])
        ['0', '1.0', '1.1']
    """
    if not names:
        raise ConfigError("give the names of the submodules to split at, in the order they run")
    known = dict(module.named_modules(remove_duplicate=False))
    result: list[str] = []
    for name in names:
        if not name or name not in known:
            children = ", ".join(n for n, _ in module.named_children())
            raise ConfigError(
                f"{type(module).__name__} has no submodule {name!r}: name submodules by their "
                f"dotted path (its children are: {children or 'none'})"
            )
        found = known[name]
        if isinstance(found, nn.ModuleList):
            result.extend(f"{name}.{child}" for child, _ in found.named_children())
        else:
            result.append(name)
    return result


def _coverage(module: nn.Module, names: Sequence[str], layers: Sequence[nn.Module]) -> None:
    """Raise unless every parameter of ``module`` is in exactly one named layer."""
    owners: dict[str, list[str]] = {}
    for name, layer in zip(names, layers, strict=True):
        for local, _ in layer.named_parameters(remove_duplicate=False):
            owners.setdefault(f"{name}.{local}", []).append(name)
    # A shared parameter is reached under several paths; one named path is enough.
    paths: dict[int, list[str]] = {}
    for path, param in module.named_parameters(remove_duplicate=False):
        paths.setdefault(id(param), []).append(path)
    missing = [ps[0] for ps in paths.values() if not any(p in owners for p in ps)]
    twice = [f"{p} ({len(o)} times)" for p, o in owners.items() if len(o) > 1]
    if missing or twice:
        problems = []
        if missing:
            problems.append(f"not in any named submodule: {', '.join(missing)}")
        if twice:
            problems.append(f"in more than one: {', '.join(twice)}")
        raise ConfigError(
            f"the submodules {list(names)} must hold every parameter of "
            f"{type(module).__name__} exactly once; {'; '.join(problems)}: name the missing "
            "submodules; drop names repeated or nested in others (a ModuleList's name already "
            "stands for all its children)"
        )


def _ties(layers: Sequence[nn.Module]) -> tuple[dict[int, str], ...]:
    """Parameters shared by several layers, as ``{layer: name inside it}`` per Parameter."""
    where: dict[int, dict[int, str]] = {}
    for index, layer in enumerate(layers):
        for local, param in layer.named_parameters():
            where.setdefault(id(param), {}).setdefault(index, local)
    return tuple(tie for tie in where.values() if len(tie) > 1)


def _check_chain(
    module: nn.Module, names: Sequence[str], layers: Sequence[nn.Module], sample: torch.Tensor
) -> None:
    """Raise unless running ``layers`` in order on ``sample`` gives ``module(sample)``."""
    fix = (
        f"{type(module).__name__}'s forward is not the chain {list(names)} (each submodule fed "
        "the previous one's single tensor output): name other submodules, or wrap the model so "
        "that its forward is such a chain, or build ModelParts yourself"
    )
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        expected = module(sample)
        torch.manual_seed(0)
        x = sample
        for name, layer in zip(names, layers, strict=True):
            try:
                x = layer(x)
            except Exception as err:  # any failure means: not a chain
                raise ConfigError(
                    f"running submodule {name!r} on the previous output failed "
                    f"({type(err).__name__}: {err}): {fix}"
                ) from None
            if not isinstance(x, torch.Tensor):
                raise ConfigError(f"submodule {name!r} returned {type(x).__name__}: {fix}")
    if not isinstance(expected, torch.Tensor):
        raise ConfigError(
            f"{type(module).__name__} returned {type(expected).__name__}, not a tensor: wrap it "
            "so that it returns the tensor the loss scores"
        )
    if x.shape != expected.shape or not torch.allclose(x, expected, rtol=1e-4, atol=1e-5):
        raise ConfigError(
            f"the chain gives {tuple(x.shape)} values that differ from the model's own output "
            f"{tuple(expected.shape)}: {fix}"
        )


def split_by_names(
    module: nn.Module,
    names: Sequence[str],
    *,
    loss_fn: LossFn,
    make_batch: BatchFn,
    seq_len: int,
    sample: torch.Tensor | None = None,
    name: str | None = None,
) -> ModelParts:
    """Cut ``module`` into the named submodules, run in that order (see the module docstring).

    Args:
        module: the model; its forward must be the chain of the named submodules.
        names: dotted submodule paths in execution order; an ``nn.ModuleList`` stands for its
            children.
        loss_fn: ``loss_fn(output, targets)``, a mean over the micro-batch's rows.
        make_batch: ``make_batch(rows, generator) -> (inputs, targets)``.
        seq_len: tokens per sequence of ``make_batch``.
        sample: an input to check the chain against ``module(sample)``; None skips the check.
        name: for reports; the module's class name by default.

    Returns:
        Parts whose layers are the module's own submodules (their Parameters are the model's).

    Raises:
        ConfigError: an unknown name, parameters not covered exactly once, or (with a sample)
            a forward that is not the chain.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> parts = split_by_names(model, ["0", "1", "2"], loss_fn=nn.functional.mse_loss,
        ...                        make_batch=lambda r, g: (torch.ones(r, 4), torch.ones(r, 2)),
        ...                        seq_len=1, sample=torch.ones(3, 4))
        >>> len(parts.layers)
        3
    """
    expanded = expand_names(module, names)
    layers = [module.get_submodule(n) for n in expanded]
    _coverage(module, expanded, layers)
    if sample is not None:
        _check_chain(module, expanded, layers, sample)
    return ModelParts(
        name=name or type(module).__name__, layers=tuple(layers), loss_fn=loss_fn,
        make_batch=make_batch, seq_len=seq_len, ties=_ties(layers),
    )
