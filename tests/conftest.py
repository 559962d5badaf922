"""Shared test set-up: the tests folder on ``sys.path`` so ``workers`` and ``runtime_workers``
import here and in spawned ranks (a spawned child inherits its parent's ``sys.path``)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest

_TESTS = str(Path(__file__).parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs torch ``torch`` (so ``-m "not torch"`` is the pure-Python
    tier): test modules that import it, and the doctests of the torch packages."""
    torch_packages = ("runtime", "train")
    for item in items:
        module = getattr(item, "module", None)
        if module is not None:
            needs_torch = _uses_torch(module)
        else:  # a doctest: by the package it documents
            needs_torch = any(part in torch_packages for part in Path(item.path).parts)
        if needs_torch or item.get_closest_marker("multiproc"):
            item.add_marker(pytest.mark.torch)


_TORCH_MODULES = ("torch", "stagewise.runtime", "stagewise.train", "workers", "runtime_workers")


def _uses_torch(module: ModuleType) -> bool:
    """Whether ``module`` holds torch, or a name from a package that imports torch."""
    for value in vars(module).values():
        origin = getattr(value, "__name__", "") if isinstance(value, ModuleType) else getattr(
            value, "__module__", "") or ""
        if isinstance(origin, str) and origin.startswith(_TORCH_MODULES):
            return True
    return False
