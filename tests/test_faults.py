"""Under faults: no hang, no orphaned rank, no silently wrong resume.

The pure parts (names, relabelling, the stall watch) are tested in-process; the slow tests run
a slice of ``benchmarks/fault_grid.py``: the real CLI in a subprocess, broken as a cluster
would break it.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("torch")

from stagewise.runtime.engine.heartbeat import StallWatch, rank_names, relabel


def _grid() -> ModuleType:
    path = Path(__file__).parents[1] / "benchmarks" / "fault_grid.py"
    spec = importlib.util.spec_from_file_location("fault_grid", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_grid"] = module
    spec.loader.exec_module(module)
    return module


def test_rank_names_follow_the_mesh_layout() -> None:
    # init_device_mesh(dp, pp, tp): tp innermost, then pp, then dp.
    assert rank_names(3) == ["rank 0", "rank 1", "rank 2"]
    assert rank_names(2, dp=2)[1:3] == ["rank 1 (pp 1, dp 0)", "rank 2 (pp 0, dp 1)"]
    assert rank_names(2, dp=2, tp=2)[5] == "rank 5 (pp 0, dp 1, tp 1)"


def test_relabel_replaces_the_pipeline_rank_only_at_the_start() -> None:
    text = "rank 1 failed at 1F3: waiting on rank 0"
    assert relabel(text, "rank 3 (pp 1, dp 1)") == (
        "rank 3 (pp 1, dp 1) failed at 1F3: waiting on rank 0")
    assert relabel("rank 12 failed", "rank 1 (pp 1, dp 0)") == "rank 1 (pp 1, dp 0) failed"
    assert relabel("the store is gone", "rank 3 (pp 1, dp 1)") == "the store is gone"


def test_stall_watch_names_the_rank_whose_beat_stopped() -> None:
    beats = {0: 1, 1: 1}
    watch = StallWatch([0, 1], stall=0.3, startup=5.0)
    read = lambda rank: (beats[rank], f"{rank}F0")  # noqa: E731
    assert watch.stalled(read) == []
    for _ in range(5):
        time.sleep(0.1)
        beats[0] += 1  # rank 0 keeps beating, rank 1 does not
        found = watch.stalled(read)
    assert found == [(1, "1F0")]
    assert watch.stalled(read, skip=lambda rank: rank == 1) == []


def test_stall_watch_gives_start_up_its_own_allowance() -> None:
    watch = StallWatch([0], stall=0.05, startup=60.0)
    watch.stalled(lambda rank: (0, "start-up"))
    time.sleep(0.1)
    assert watch.stalled(lambda rank: (0, "start-up")) == []


def test_start_up_allowance_shrinks_once_another_rank_beats() -> None:
    watch = StallWatch([0, 1], stall=0.1, startup=60.0)
    beats = {0: 1, 1: 0}
    read = lambda rank: (beats[rank], "start-up")  # noqa: E731
    watch.stalled(read)
    # Rank 0 beat first: rank 1 gets stall + 30 s from then, not the full 60 s.
    assert watch._startup_limit() == pytest.approx(30.1, abs=0.05)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_stopped_rank_is_named_first_and_the_run_ends_within_the_timeout() -> None:
    grid = _grid()
    result = grid.run_case(grid.Case("stop", rank=1, moment=2, timeout=8.0))
    assert result.outcome == "clean", result.message
    assert "rank 1 stopped responding at" in result.message.split("; then ")[0]
    assert result.seconds < 8.0 + 15


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("fault", ["launcher-kill", "launcher-term"])
def test_ranks_die_with_their_launcher_and_no_temporary_folder_is_left(fault: str) -> None:
    grid = _grid()
    result = grid.run_case(grid.Case(fault, moment=2))
    assert result.outcome == "clean", result.message
    assert result.seconds < 10
    if fault == "launcher-term":
        assert "the launcher was stopped by SIGTERM" in result.message


def _fake_checkpoint(root: Path, step: int) -> Path:
    """A folder shaped like a complete checkpoint (DCP's metadata, a shard, extra.pt)."""
    from stagewise.runtime.checkpoint.manifest import write_marker

    folder = root / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"meta")
    (folder / "__0_0.distcp").write_bytes(bytes(range(256)) * 4)
    (folder / "extra.pt").write_bytes(b"extra")
    write_marker(folder, step, world_size=2)
    return folder


@pytest.mark.parametrize(("damage", "words"), [
    ("flip", "__0_0.distcp does not match its checksum"),
    ("truncate", "__0_0.distcp has 512 bytes, 1024 were written"),
    ("empty", "__0_0.distcp has 0 bytes"),
    ("delete", "__0_0.distcp is missing"),
    ("marker", "COMPLETE marker is missing"),
])
def test_a_damaged_newest_checkpoint_is_refused_naming_the_file(
        tmp_path: Path, damage: str, words: str) -> None:
    from stagewise.errors import ConfigError
    from stagewise.runtime.checkpoint.folders import resume_checkpoint

    _fake_checkpoint(tmp_path, 2)
    newest = _fake_checkpoint(tmp_path, 4)
    assert resume_checkpoint(tmp_path) == newest
    shard = newest / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[100:116] = bytes(255 - b for b in data[100:116])
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:512]))
    elif damage == "empty":
        shard.write_bytes(b"")
    elif damage == "delete":
        shard.unlink()
    else:
        (newest / "COMPLETE").unlink()
    with pytest.raises(ConfigError) as caught:
        resume_checkpoint(tmp_path)
    assert words in str(caught.value)
    assert "step-00000004" in str(caught.value)
    assert "the newest older complete one is step 2" in str(caught.value)
    # Going back is explicit.
    assert resume_checkpoint(tmp_path, 2) == tmp_path / "step-00000002"


def test_resume_from_a_step_without_a_checkpoint_lists_the_complete_ones(tmp_path: Path) -> None:
    from stagewise.errors import ConfigError
    from stagewise.runtime.checkpoint.folders import resume_checkpoint

    _fake_checkpoint(tmp_path, 2)
    with pytest.raises(ConfigError, match=r"no checkpoint of step 3 \(complete ones: steps 2\)"):
        resume_checkpoint(tmp_path, 3)


def test_a_second_run_on_a_checkpoint_folder_is_refused(tmp_path: Path) -> None:
    from stagewise.errors import ConfigError
    from stagewise.runtime.checkpoint.lock import LOCK, checkpoint_lock

    with checkpoint_lock(tmp_path, "first"):
        refused = pytest.raises(ConfigError, match=r"in use by another run \(host .*run first\)")
        with refused, checkpoint_lock(tmp_path, "second"):
            pass
        assert (tmp_path / LOCK).exists()
    assert not (tmp_path / LOCK).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import socket
    import subprocess

    from stagewise.runtime.checkpoint.lock import LOCK, checkpoint_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                             "run": "old"}))
    with checkpoint_lock(tmp_path, "new"):
        assert json.loads((tmp_path / LOCK).read_text())["run"] == "new"
    assert f"left by pid {dead.pid} (run old), which is no longer running" in (
        capsys.readouterr().err)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize(("fault", "words"), [
    ("flip", "__1_0.distcp does not match its checksum"),
    ("disk", "could not write checkpoint step 2"),
])
def test_checkpoint_faults_end_in_one_line(fault: str, words: str) -> None:
    # flip: 16 bytes of the newest shard, then --resume (refused before launch, file named);
    # disk: files capped below one shard's size at the first save (partial folder removed).
    grid = _grid()
    result = grid.run_case(grid.Case(fault, steps=6))
    assert result.outcome == "clean", result.message
    assert words in result.message


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_under_torchrun_a_stopped_rank_is_named_by_its_peer(tmp_path: Path) -> None:
    import os
    import signal
    import socket
    import subprocess

    import psutil

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "stagewise",
               "train", "-m", "2", "--steps", "100000", "--no-plots", "--timeout", "8",
               "--global-batch", "4", "--seq-len", "16", "--dim", "32", "--layers", "2"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.stdout is not None
    for line in run.stdout:  # the per-step lines: the ranks are training
        if line.startswith("step") and line.split()[1] == "3":
            break
    workers = sorted((c for c in psutil.Process(run.pid).children(recursive=True)
                      if "stagewise" in " ".join(c.cmdline())), key=lambda c: c.create_time())
    workers[-1].send_signal(signal.SIGSTOP)  # rank 1
    start = time.monotonic()
    _, err = run.communicate(timeout=120)
    elapsed = time.monotonic() - start
    assert run.returncode != 0
    first = next(line for line in err.splitlines() if line.startswith("stagewise:"))
    assert "rank 1 stopped responding at" in first
    assert elapsed < 8 + 15
    assert not any(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
                   for worker in workers)
