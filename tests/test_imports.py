"""The maths and the planner import without torch or matplotlib (fast, usable on a laptop)."""

from __future__ import annotations

import subprocess
import sys

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
