"""``stagewise train``: runs, reports, writes pictures, fails cleanly, runs under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stagewise.cli import cli
from stagewise.mesh import Mesh
from stagewise.runconfig import ModelConfig, RunConfig, ScheduleConfig, TrainingConfig
from stagewise.schedules import build

pytest.importorskip("torch")

SMALL = ["--layers", "2", "--dim", "32", "--seq-len", "16", "--global-batch", "8"]


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_train_json_report_and_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli(["train", "-p", "2", "-m", "4", "--steps", "8", "--json", "--out", str(tmp_path),
                *SMALL])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["schedule"] == "1f1b"
    assert report["num_ranks"] == 2
    losses = report["losses"]
    assert len(losses) == 8
    assert losses[-1] < losses[0]
    assert len(report["step_seconds"]) == 8
    assert report["tokens_per_second"] > 0
    for key in ("of_step", "vs_ideal"):
        assert report["measured_bubble"][key] >= 0
        assert report["predicted_bubble"][key] >= 0
    # Bytes saved for backward were counted on every rank and predicted from the same sizes.
    assert all(b > 0 for b in report["measured_activation_bytes"])
    assert len(report["predicted_activation_bytes"]) == 2
    names = sorted(Path(p).name for p in report["files"])
    assert names == ["memory.png", "predicted-vs-measured.png", "timeline.png", "trace.json"]
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert trace["traceEvents"]
    assert (tmp_path / "timeline.png").stat().st_size > 1000


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_train_split_backward_schedule_file_prints_the_comparison(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build("zb-h1", num_ranks=2, num_microbatches=4).save_csv(tmp_path / "zb.csv")
    code = cli(["train", "--schedule-file", str(tmp_path / "zb.csv"), "--steps", "3",
                "--no-plots", *SMALL])
    assert code == 0
    out = capsys.readouterr().out
    assert "with zb.csv: 2 ranks, 2 stages, 4 micro-batches" in out
    assert "bubble, idle share of the step: measured" in out
    assert "predicted" in out
    assert "rank 1:" in out
    assert "MiB" in out


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_nan_with_check_finite_exits_1_naming_rank_and_action(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # An infinite learning rate turns every weight into inf/NaN after the first step.
    code = cli(["train", "-p", "2", "-m", "2", "--steps", "3", "--lr", "inf", "--check-finite",
                "--no-plots", "--json", "--timeout", "20", *SMALL])
    assert code == 1
    err = capsys.readouterr().err
    assert "training failed: rank 1 failed at 1F0" in err
    assert "NonFiniteLoss" in err


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_recompute_trains_the_same_with_less_activation_memory(
    capsys: pytest.CaptureFixture[str],
) -> None:
    reports = []
    for extra in ([], ["--recompute"]):
        code = cli(["train", "-s", "zb-h1", "-p", "2", "-m", "4", "--steps", "3", "--json",
                    "--no-plots", *SMALL, *extra])
        assert code == 0
        reports.append(json.loads(capsys.readouterr().out))
    plain, recomputing = reports
    # The same arithmetic in the same order: the losses agree to rounding.
    assert recomputing["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    for before, after in zip(plain["measured_activation_bytes"],
                             recomputing["measured_activation_bytes"], strict=True):
        assert after < before / 3


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_tensor_parallel_mesh_trains_like_one_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    reports = []
    for extra in (["-p", "2"], ["--mesh", "pp=2,tp=2"]):
        code = cli(["train", "-m", "4", "--steps", "3", "--json", "--no-plots", *SMALL, *extra])
        assert code == 0
        reports.append(json.loads(capsys.readouterr().out))
    plain, sharded = reports
    assert sharded["mesh"] == {"pp": 2, "dp": 1, "tp": 2, "fsdp": False}
    # The same model and data; only the summation order inside the sharded matmuls differs.
    assert sharded["losses"] == pytest.approx(plain["losses"], rel=1e-4)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_plan_emit_config_runs_under_train_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stagewise.runconfig import load_run_config

    path = tmp_path / "run.toml"
    assert cli(["plan", "--model", "tiny-llama", "--gpu", "cpu", "--nodes", "1",
                "--gpus-per-node", "4", "--seq", "16", "--global-batch", "8", "--pp", "2",
                "--tp", "2", "--emit-config", str(path)]) == 0
    capsys.readouterr()
    planned = load_run_config(path)
    # Flags given beside --config override the file's (here: fewer steps).
    assert cli(["train", "--config", str(path), "--steps", "2", "--json", "--no-plots"]) == 0
    report = json.loads(capsys.readouterr().out)
    mesh = planned.mesh
    assert report["mesh"] == {"pp": mesh.pp, "dp": mesh.dp, "tp": mesh.tp, "fsdp": False} == {
        "pp": 2, "dp": 1, "tp": 2, "fsdp": False}
    assert report["schedule"] == planned.schedule.name
    assert report["num_microbatches"] == planned.schedule.num_microbatches
    assert report["steps"] == 2
    assert report["tokens_per_step"] == planned.batch.global_batch * planned.batch.seq_len
    assert len(report["losses"]) == 2


@pytest.mark.multiproc
@pytest.mark.parametrize("model", ["hf:llama", "hf:gpt2"])
@pytest.mark.timeout(180)
def test_hugging_face_models_train(model: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli(["train", "--model", model, "-s", "1f1b", "-p", "2", "-m", "2", "--steps", "6",
                "--lr", "1e-2", "--seq-len", "16", "--global-batch", "8", "--json", "--no-plots"])
    assert code == 0
    losses = json.loads(capsys.readouterr().out)["losses"]
    assert losses[-1] < losses[0]


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_ranks_that_fill_only_their_stages_train_the_whole_builds_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """hf: models: --partition params builds empty and fills each rank's stages; time builds
    the whole model on every rank. GPT-2's tied embedding and head sit on different ranks."""
    runs = {}
    for partition in ("params", "time"):
        assert cli(["train", "--model", "hf:gpt2", "-s", "1f1b", "-p", "2", "-m", "2",
                    "--steps", "3", "--seq-len", "16", "--global-batch", "4", "--json",
                    "--no-plots", "--partition", partition]) == 0
        runs[partition] = json.loads(capsys.readouterr().out)["losses"]
    assert runs["params"] == pytest.approx(runs["time"], rel=1e-5)


def _losses(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    assert cli(["train", "--json", "--no-plots", *SMALL, *argv]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_resume_repeats_the_uninterrupted_losses_on_any_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = str(tmp_path / "ckpt")
    whole = _losses(capsys, ["-p", "2", "-m", "4", "--steps", "6"])["losses"]
    first = _losses(capsys, ["-p", "2", "-m", "4", "--steps", "4", "--checkpoint-dir", folder,
                             "--save-every", "2", "--keep", "1"])
    assert first["losses"] == whole[:4]
    assert sorted(p.name for p in Path(folder).iterdir()) == ["step-00000004"]
    same = _losses(capsys, ["-p", "2", "-m", "4", "--steps", "6", "--checkpoint-dir", folder,
                            "--resume"])
    assert same["resumed_from"] == 4
    assert same["losses"] == whole  # bit for bit: same layout, same data, same arithmetic
    other = _losses(capsys, ["--mesh", "pp=1,dp=2", "-m", "2", "--steps", "6",
                             "--checkpoint-dir", folder, "--resume"])
    assert other["losses"][:4] == whole[:4]
    assert other["losses"][4:] == pytest.approx(whole[4:], rel=1e-5)


@pytest.mark.multiproc
def test_resume_without_a_checkpoint_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli(["train", "-p", "2", "-m", "2", "--steps", "3", "--no-plots", *SMALL,
                "--checkpoint-dir", str(tmp_path), "--resume"])
    assert code == 2
    assert "cannot resume: no complete checkpoint" in capsys.readouterr().err


@pytest.mark.multiproc
def test_fsdp_with_a_split_backward_schedule_is_refused_before_launch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli(["train", "--mesh", "pp=2,fsdp=2", "-s", "zb-h1", "-m", "4", "--no-plots", *SMALL])
    assert code == 2
    err = capsys.readouterr().err
    assert "fsdp" in err
    assert "'zb-h1'" in err
    assert "use a schedule without I/W" in err


@pytest.mark.multiproc
def test_impossible_split_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli(["train", "-s", "interleaved-1f1b", "-p", "4", "-m", "4", "--layers", "1",
                "--no-plots"])
    assert code == 2
    err = capsys.readouterr().err
    assert "8 stages but the model has 3 layers (1 block, the embedding and the head)" in err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_same_command_runs_under_torchrun_on_two_nodes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = []
    for node_rank in (0, 1):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--nproc-per-node", "2", "--node-rank", str(node_rank), "--master-addr", "127.0.0.1",
            "--master-port", str(port), "-m", "stagewise", "train", "-m", "2", "--steps", "3",
            "--mesh", "pp=2,dp=2", "--json", "--no-plots", "--timeout", "60", *SMALL,
        ]
        nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=tmp_path))
    outputs = [node.communicate(timeout=160) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-2000:]
    out = outputs[0][0]
    report = json.loads(out[out.index("{"):])
    # The mesh spans both "nodes": dp rank 1's pipeline runs on the second node's processes.
    assert report["mesh"] == {"pp": 2, "dp": 2, "tp": 1, "fsdp": False}
    assert report["num_ranks"] == 2
    assert len(report["losses"]) == 3
    assert outputs[1][0].strip() == ""  # only global rank 0 prints
    # The same flags on local processes train the same model on the same data.
    local = _losses(capsys, ["-m", "2", "--steps", "3", "--mesh", "pp=2,dp=2"])
    assert report["losses"] == pytest.approx(local["losses"], rel=1e-6)


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_a_failure_under_torchrun_exits_non_zero_with_the_first_error(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "stagewise",
        "train", "-m", "2", "--steps", "3", "--lr", "inf", "--check-finite", "--no-plots",
        "--timeout", "20", *SMALL,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=110, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "training failed: rank 1 failed at 1F0" in done.stderr
    assert "NonFiniteLoss" in done.stderr


def _merged(argv: list[str]) -> RunConfig:
    """What ``stagewise train`` would run for ``argv`` (parsed and merged, nothing launched)."""
    from stagewise.cli._train_flags import run_config
    from stagewise.cli.main import build_parser

    return run_config(build_parser(argv).parse_args(argv), torchrun=False)


def test_config_flags_equal_to_train_defaults_still_win(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(RunConfig(
        mesh=Mesh(pp=2, dp=2),
        schedule=ScheduleConfig(name="interleaved-1f1b", num_chunks=2, num_microbatches=4),
        training=TrainingConfig(steps=5, lr=0.01, recompute="full"),
        model=ModelConfig(layers=8, dim=32),
    ).to_toml())
    plain = _merged(["train", "--config", str(path)])
    assert (plain.training.steps, plain.training.lr, plain.training.recompute,
            plain.schedule.num_chunks, plain.model.layers) == (5, 0.01, "full", 2, 8)
    # 30 steps, lr 3e-3 and 6 layers are train's own defaults: given, they still override.
    given = _merged(["train", "--config", str(path), "--steps", "30", "--lr", "3e-3",
                     "--layers", "6", "--no-recompute"])
    assert (given.training.steps, given.training.lr, given.training.recompute,
            given.model.layers) == (30, 3e-3, "none", 6)
    assert given.mesh == Mesh(pp=2, dp=2)
    assert given.schedule.num_microbatches == 4
    # Another schedule on the command line does not inherit the file's v.
    other = _merged(["train", "--config", str(path), "-s", "1f1b"])
    assert (other.schedule.name, other.schedule.num_chunks) == ("1f1b", 1)
    same = _merged(["train", "--config", str(path), "-s", "interleaved-1f1b"])
    assert same.schedule.num_chunks == 2
    # A schedule file brings its own sizes; another model does not take the file's shape.
    build("1f1b", num_ranks=2, num_microbatches=6).save_csv(tmp_path / "s.csv")
    csv = _merged(["train", "--config", str(path), "--schedule-file", str(tmp_path / "s.csv")])
    assert (csv.schedule.file, csv.schedule.num_chunks, csv.schedule.num_microbatches) == (
        str(tmp_path / "s.csv"), 1, 6)
    hf = _merged(["train", "--config", str(path), "--model", "hf:llama"])
    assert (hf.model.spec, hf.model.layers, hf.model.dim, hf.model.hf_config) == (
        "hf:llama", None, None, {})


def test_flags_that_contradict_are_refused(tmp_path: Path) -> None:
    from stagewise.errors import ConfigError

    with pytest.raises(ConfigError, match=r"-p 3 disagrees with --mesh pp=2,dp=2 \(pp=2\)"):
        _merged(["train", "-p", "3", "--mesh", "pp=2,dp=2"])
    build("1f1b", num_ranks=2, num_microbatches=4).save_csv(tmp_path / "s.csv")
    with pytest.raises(ConfigError, match=r"-m 8 disagrees with .*s.csv, which has 4"):
        _merged(["train", "--schedule-file", str(tmp_path / "s.csv"), "-m", "8"])
    with pytest.raises(ConfigError, match=r"schedule file .*s.csv has 2 ranks but the mesh has "
                                          r"pp=3"):
        _merged(["train", "--schedule-file", str(tmp_path / "s.csv"), "-p", "3"])
    with pytest.raises(ConfigError, match=r"lr must be a positive number, got nan"):
        _merged(["train", "--lr", "nan"])


def test_batch_size_still_works_with_a_deprecation_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _merged(["train", "--batch-size", "24"])
    assert config.batch.global_batch == 24
    assert "--batch-size is deprecated; use --global-batch" in capsys.readouterr().err


@pytest.mark.multiproc
@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the refusal on a machine without GPUs"
)
def test_device_cuda_without_a_gpu_is_refused_before_launch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli(["train", "--device", "cuda", "-p", "2", "-m", "2", "--steps", "2", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "--device cuda but this machine has no CUDA GPU" in err
    assert "--device cpu" in err
    assert len(err.strip().splitlines()) == 1


def test_device_cuda_refuses_more_local_ranks_than_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from stagewise.errors import ConfigError
    from stagewise.train.trainer import check_gpus as _check_gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _check_gpus(1, "local processes")
    with pytest.raises(ConfigError, match=r"4 local processes need 4 GPUs and this machine has 1"):
        _check_gpus(4, "local processes")


def test_a_plain_pipeline_shares_one_gpu_over_gloo_and_a_mesh_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from types import SimpleNamespace

    import torch

    from stagewise.errors import ConfigError
    from stagewise.mesh import Mesh
    from stagewise.train.trainer import local_backend

    def job(mesh: str) -> Any:
        parsed = Mesh.parse(mesh)
        launch = SimpleNamespace(backend="nccl")
        return SimpleNamespace(world_size=parsed.world_size,
                               config=SimpleNamespace(mesh=parsed, launch=launch))

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert local_backend(job("pp=1")) == "nccl"  # one rank, one GPU
    assert local_backend(job("pp=2")) == "gloo"  # NCCL refuses two ranks on one GPU
    assert "2 ranks share 1 GPU(s): gloo" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="only a plain local pipeline"):
        local_backend(job("pp=2,dp=2"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert local_backend(job("pp=2")) == "nccl"
