"""Tensor parallelism: the mesh's tp axis, sharded blocks equal to one process.

Each multi-process run compares loss and every gradient (sharded ones gathered whole) with a
deep copy of the unsharded model trained in one process on the whole global batch, over 2
optimizer steps, and checks replicated parameters' gradients agree over the tp ranks.
"""

from __future__ import annotations

import pytest

from stagewise.errors import ConfigError

torch = pytest.importorskip("torch")

from stagewise.runtime import launch  # noqa: E402
from stagewise.runtime.mesh import MeshSpec  # noqa: E402
from stagewise.runtime.verify_mesh import check_llama_tp_rank, check_mesh_rank  # noqa: E402


def test_parse_with_tp() -> None:
    assert MeshSpec.parse("pp=2,dp=2,tp=2") == MeshSpec(pp=2, dp=2, tp=2)
    assert MeshSpec.parse("tp=4, pp=2") == MeshSpec(pp=2, dp=1, tp=4)
    assert MeshSpec.parse("tp=2,dp=3,pp=2", world_size=12).world_size == 12
    with pytest.raises(ConfigError, match=r"needs pp\*dp\*tp = 8 ranks but the world has 4"):
        MeshSpec.parse("pp=2,dp=2,tp=2", world_size=4)
    with pytest.raises(ConfigError, match="tp=0"):
        MeshSpec.parse("pp=2,tp=0")


def _no_problems(results: list[dict[str, list[str]]], names: list[str]) -> None:
    for name in names:
        problems = [line for per_rank in results for line in per_rank[name]]
        assert not problems, "\n".join(problems[:10])


@pytest.mark.timeout(150)
def test_pp2_tp2_equals_one_process() -> None:
    names = ["1f1b", "zb-h1"]
    results = launch(check_mesh_rank, 4, (MeshSpec(pp=2, tp=2), names), timeout=130)
    assert len(results) == 4
    _no_problems(results, names)


@pytest.mark.timeout(150)
def test_pp2_dp2_tp2_equals_one_process() -> None:
    results = launch(check_mesh_rank, 8, (MeshSpec(pp=2, dp=2, tp=2), ["1f1b"]), timeout=130)
    assert len(results) == 8
    _no_problems(results, ["1f1b"])


@pytest.mark.timeout(120)
def test_llama_layers_tp2_equal_unsharded() -> None:
    pytest.importorskip("transformers")
    results = launch(check_llama_tp_rank, 2, (), timeout=100)
    problems = [line for per_rank in results for line in per_rank]
    assert not problems, "\n".join(problems[:10])
