"""The maths and the planner import without torch or matplotlib (fast, usable on a laptop)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("module", ["stagewise", "stagewise.schedules", "stagewise.sim",
                                    "stagewise.plan", "stagewise.viz"])
def test_import_pulls_in_no_torch(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "heavy = [m for m in ('torch', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "", f"{module} imported {done.stdout.strip()}"



SRC = Path(__file__).resolve().parent.parent / "src" / "stagewise"


def imported_modules(source: str, package: str) -> set[str]:
    """Every module ``source`` imports, anywhere in it (functions too), as absolute names.

    ``package`` is the dotted package the source sits in, for relative imports.
    ``from stagewise import sim`` counts as both ``stagewise`` and ``stagewise.sim``.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def subpackages_imported_by(package: str) -> dict[str, set[str]]:
    """For each module of ``stagewise.<package>``: the other stagewise subpackages it imports."""
    result = {}
    for path in sorted((SRC / package).rglob("*.py")):
        dotted = ".".join(("stagewise", *path.parent.relative_to(SRC).parts))
        parts = [name.split(".") for name in imported_modules(path.read_text(), dotted)]
        used = {p[1] for p in parts if p[0] == "stagewise" and len(p) > 1}
        result[str(path.relative_to(SRC))] = used - {package}
    return result


def test_imported_modules_sees_every_spelling() -> None:
    source = (
        "import stagewise.sim.costs\n"
        "from stagewise import search\n"
        "def f():\n"
        "    from ..sim import simulate\n"
        "    from .ir import Op\n"
    )
    found = imported_modules(source, "stagewise.schedules")
    assert {"stagewise.sim.costs", "stagewise.search", "stagewise.sim",
            "stagewise.schedules.ir"} <= found


@pytest.mark.parametrize(("package", "allowed"), [
    ("schedules", {"errors"}),  # the IR, generators, validator and registry: nothing above
    ("sim", {"errors", "schedules"}),  # the simulator reads schedules and knows no search
    ("search", {"errors", "schedules", "sim"}),  # the search times candidates by simulating
])
def test_package_graph_is_acyclic(package: str, allowed: set[str]) -> None:
    """schedules <- sim <- search: no module under schedules imports sim or search."""
    for module, used in subpackages_imported_by(package).items():
        assert used <= allowed, f"{module} imports stagewise.{sorted(used - allowed)}"


def test_auto_is_registered_for_any_import_of_schedules() -> None:
    code = "import stagewise.schedules as s; print('auto' in s.names())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "True"
