"""Bugs that were found and fixed, each with its story, so they stay fixed.

Each test names the issue it came from. Keep the story short: what a user saw, why, the fix.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from stagewise.cli import cli
from stagewise.errors import ConfigError
from stagewise.mesh import Mesh
from stagewise.runconfig import ModelConfig, RunConfig, ScheduleConfig, parse_run_config

ROOT = Path(__file__).resolve().parents[1]


def test_float32_losses_are_not_held_to_float64_tolerance() -> None:
    """Issue 11. ``make test`` failed on another CPU: the checkpoint tests compared float32
    losses, turned into Python floats, with ``assert_close``, which then uses float64's 1e-7.
    The pipelined and one-process losses differed by 4.8e-7. Fix: a stated float32 tolerance
    where the arithmetic differs (bit-for-bit stays where both sides do the same sums)."""
    torch = pytest.importorskip("torch")
    seen = (3.2109, 3.2109 + 4.8e-7)  # two float32 ulps apart at this size
    with pytest.raises(AssertionError):
        torch.testing.assert_close(*seen)  # the old comparison fails
    torch.testing.assert_close(*seen, rtol=1e-5, atol=1e-6)  # the stated one holds


def test_usage_errors_name_the_command_once() -> None:
    """Issue 11. A mistyped verb said "(see stagewise stagewise -h)": the hint repeated the
    program's name. Fix: the hint is the parser's own prog ("stagewise", "stagewise train")."""
    done = subprocess.run([sys.executable, "-m", "stagewise", "simulat"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "(see stagewise -h)" in done.stderr
    assert "stagewise stagewise" not in done.stderr


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 11. There was no ``--version``."""
    from stagewise import __version__

    assert cli(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"stagewise {__version__}"


def test_readme_and_pyproject_agree_on_python() -> None:
    """Issue 11. README said Python 3.10+ while pyproject required 3.11; ruff targeted 3.10."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    required = project["project"]["requires-python"]
    assert required == ">=3.11"
    assert "Python 3.11+" in (ROOT / "README.md").read_text()
    assert project["tool"]["ruff"]["target-version"] == "py311"


def test_readme_points_inside_the_repository() -> None:
    """Issue 11. README linked ../shared/DESIGN.md, which a user's clone does not have."""
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme
    assert (ROOT / "ARCHITECTURE.md").exists()


def test_benchmarks_read_their_data_from_the_repository() -> None:
    """Issue 11. benchmarks/planner_accuracy.py crashed in a clone with FileNotFoundError:
    it read ../shared/reference/calibration_runs.json. Fix: the data lives in the repo."""
    for script in (ROOT / "benchmarks").glob("*.py"):
        assert "shared/reference" not in script.read_text(), script.name


def test_a_run_file_can_say_fsdp() -> None:
    """Issue 11. The mesh was defined three times; the run file's had no fsdp, so a planned
    FSDP run could not be written down. Fix: one Mesh type, written as [mesh] dp_shard."""
    config = RunConfig(mesh=Mesh(pp=2, dp=2, dp_shard=True))
    assert parse_run_config(config.to_toml()).mesh.dp_shard


def test_interleaved_on_the_default_model_is_not_refused() -> None:
    """Issue 11 (found while merging the run configuration paths). The run file compared
    pp x v stages with the model's blocks, but the pipeline also cuts the embedding and the
    head into layers: pp=4, v=2 on 6 blocks (8 layers) was refused by a file and accepted by
    the flags. Fix: one check, on the layers the pipeline cuts."""
    config = RunConfig(mesh=Mesh(pp=4), schedule=ScheduleConfig("interleaved-1f1b", 2, 8),
                       model=ModelConfig(layers=6))
    assert config.schedule.num_chunks == 2
    with pytest.raises(ConfigError, match="8 stages but the model has 7 layers"):
        RunConfig(mesh=Mesh(pp=4), schedule=ScheduleConfig("interleaved-1f1b", 2, 8),
                  model=ModelConfig(layers=5))


def test_a_nan_learning_rate_is_refused_before_any_rank_starts() -> None:
    """Issue 15 (fixed by issue 11's one configuration path). ``--lr nan`` was only caught
    after the ranks had started, because the flags bypassed the run file's checks."""
    from stagewise.cli._train_flags import run_config
    from stagewise.cli.main import build_parser

    argv = ["train", "--lr", "nan"]
    with pytest.raises(ConfigError, match="lr must be a positive number"):
        run_config(build_parser(argv).parse_args(argv), torchrun=False)


def test_schedules_import_nothing_above_them() -> None:
    """Issue 11. ``schedules`` imported ``sim`` (search, list scheduler) while ``sim``
    imported ``schedules``: a package cycle. Fix: the search lives in ``stagewise.search``."""
    for path in (ROOT / "src" / "stagewise" / "schedules").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("stagewise.sim", "stagewise.search")), path


def test_no_test_helper_ships_in_the_library() -> None:
    """Issue 11. ``runtime/verify*.py`` (747 lines used only by tests) shipped in the
    package. Fix: they are ``tests/workers``."""
    library = ROOT / "src" / "stagewise"
    assert not list(library.rglob("verify*.py"))
    assert (ROOT / "tests" / "workers" / "pipeline.py").exists()


def test_a_schedule_file_that_is_not_utf8_is_a_message(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 15. A schedule file with non-UTF-8 bytes gave a raw UnicodeDecodeError
    traceback. Fix: one line naming the file and what a schedule file holds."""
    path = tmp_path / "bad.csv"
    path.write_bytes(b"\xff\xfe0F0\n")
    assert cli(["simulate", "--schedule-file", str(path)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("steps", [0, 1])
def test_too_few_steps_get_one_message(steps: int) -> None:
    """Issue 15. ``--steps 0`` said ">= 1", then ``--steps 1`` said ">= 2"."""
    from stagewise.runconfig import TrainingConfig

    with pytest.raises(ConfigError, match="needs steps >= 2"):
        TrainingConfig(steps=steps)


def test_zero_pipeline_ranks_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """Found in the final check of issue 11: ``train -p 0`` read 0 as "not given" and
    trained on the default 4 ranks. Fix: only an absent flag takes the default."""
    assert cli(["train", "-p", "0", "--no-plots"]) == 2
    assert "pp=0: every axis size must be an integer >= 1" in capsys.readouterr().err
