"""Pipeline x data parallelism: mesh parsing, equivalence with one process, the CLI.

The equivalence run launches 4 ranks as pp=2 x dp=2 once and checks 1F1B, ZB-H1 (split
backward) and interleaved 1F1B (two stages per rank) in it: loss and every gradient, over 2
optimizer steps, against a deep copy of the whole model trained in one process on the whole
global batch with a mean loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stagewise.cli import cli
from stagewise.errors import ConfigError

torch = pytest.importorskip("torch")

from stagewise.runtime import launch  # noqa: E402
from stagewise.runtime.parallel.mesh import Mesh, replica_slice  # noqa: E402
from workers.mesh import check_mesh_rank  # noqa: E402

SMALL = ["--layers", "2", "--dim", "16", "--seq-len", "8", "--global-batch", "8", "-m", "2"]


def test_parse_any_order_and_defaults() -> None:
    assert Mesh.parse("pp=2,dp=2") == Mesh(pp=2, dp=2, tp=1)
    assert Mesh.parse(" dp=3 , pp=1 ") == Mesh(pp=1, dp=3)
    assert Mesh.parse("pp=4") == Mesh(pp=4, dp=1)
    assert Mesh.parse("pp=2,dp=3", world_size=6).world_size == 6


@pytest.mark.parametrize(
    ("text", "world", "words"),
    [
        ("pp=2,xp=2", None, "unknown axis 'xp'"),
        ("pp=0,dp=2", None, "pp=0"),
        ("pp=2,dp=-1", None, "dp=-1"),
        ("pp=2,dp=two", None, "not an integer"),
        ("pp=2,pp=2", None, "given twice"),
        ("pp2", None, "not axis=size"),
        ("pp=2,tp=-2", None, "tp=-2"),
        ("pp=2,dp=2", 6, "needs pp*dp*tp = 4 ranks but the world has 6"),
    ],
)
def test_parse_errors_name_the_fix(text: str, world: int | None, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        Mesh.parse(text, world_size=world)
    assert words in str(info.value)


def test_replica_slice_splits_evenly_or_refuses() -> None:
    batch = torch.arange(8)
    parts = [replica_slice(batch, 4, r).tolist() for r in range(4)]
    assert parts == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ConfigError, match="multiple of 3"):
        replica_slice(batch, 3, 0)


@pytest.mark.multiproc
@pytest.mark.timeout(120)
@pytest.mark.parametrize("overlap", [False, True], ids=["after-step", "overlapped"])
def test_pp2_dp2_equals_one_process(overlap: bool) -> None:
    spec = Mesh(pp=2, dp=2)
    results = launch(
        check_mesh_rank, 4, (spec, ["1f1b", "zb-h1", "interleaved-1f1b"], overlap),
        timeout=100, threads=1,
    )
    assert len(results) == 4
    for name in ("1f1b", "zb-h1", "interleaved-1f1b"):
        problems = [line for per_rank in results for line in per_rank[name]]
        assert not problems, "\n".join(problems[:10])


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_train_with_mesh_matches_one_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli(["train", "--mesh", "pp=2,dp=2", "--steps", "2", "--json", "--no-plots", *SMALL])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mesh"] == {"pp": 2, "dp": 2, "tp": 1, "fsdp": False}
    assert report["num_ranks"] == 2
    assert report["tokens_per_step"] == 8 * 8
    assert len(report["losses"]) == 2
    assert len(report["step_seconds"]) == 2
    # One pipeline on the whole batch (same seed, same data) reaches the same losses.
    assert cli(["train", "-p", "2", "--steps", "2", "--json", "--no-plots", *SMALL]) == 0
    single = json.loads(capsys.readouterr().out)
    torch.testing.assert_close(report["losses"], single["losses"], rtol=1e-4, atol=1e-5)


@pytest.mark.multiproc
@pytest.mark.parametrize(
    ("mesh", "words"),
    [("pp=2,dp=3", "does not split evenly")],
)
def test_train_bad_mesh_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], mesh: str, words: str
) -> None:
    code = cli(["train", "--mesh", mesh, "--steps", "2", "--no-plots", *SMALL])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert words in err


@pytest.mark.multiproc
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sizes", [(2, 2, 1), (2, 1, 2)], ids=["pp2-dp2", "pp2-tp2"])
def test_gloo_pipeline_groups_for_an_nccl_mesh_match_the_mesh(
    sizes: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA the mesh is NCCL and the pipeline's transfers need a gloo twin of pp_group."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from runtime_workers import pipeline_groups

    pp, dp, tp = sizes
    results = launch(pipeline_groups, 4, (Mesh(pp=pp, dp=dp, tp=tp),), timeout=50)
    for rank, (mesh_ranks, twin_ranks, backend) in enumerate(results):
        dp_rank, tp_rank = rank // (pp * tp), rank % tp  # rank = (dp * pp + pp_rank) * tp + tp
        expected = [(dp_rank * pp + p) * tp + tp_rank for p in range(pp)]
        assert mesh_ranks == twin_ranks == expected
        assert backend == "gloo"
