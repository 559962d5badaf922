"""Run configurations: TOML round trips, train flags, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stagewise.cli.main import build_parser, cli
from stagewise.errors import ConfigError
from stagewise.runconfig import (
    BatchConfig,
    Mesh,
    ModelConfig,
    RunConfig,
    ScheduleConfig,
    SourceInfo,
    TrainingConfig,
    load_run_config,
    parse_run_config,
)

LLAMA = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 128, "tie_word_embeddings": False, "hidden_act": "silu",
    "rms_norm_eps": 1e-05, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    "name_or_path": 'quote " and \\ backslash', "layer_types": ["full", "full"],
    "odd key": "tab\t newline\n del\x7f nul\x00 \u00e9 \U0001f600",
}


def _full() -> RunConfig:
    return RunConfig(
        mesh=Mesh(pp=2, dp=2, tp=2),
        schedule=ScheduleConfig("interleaved-1f1b", num_chunks=2, num_microbatches=8),
        batch=BatchConfig(global_batch=32, micro_batch_size=2, seq_len=64),
        training=TrainingConfig(steps=20, lr=0.003, recompute="full"),
        model=ModelConfig("hf:llama", hf_config=dict(LLAMA)),
        source=SourceInfo(model="tiny-llama", gpu="cpu", nodes=1, gpus_per_node=8,
                          configuration="TP=2 PP=2 DP=2", predicted_step_s=0.125,
                          memory_per_gpu_gib=1.5, notes=("one", "two")),
    )


@pytest.mark.parametrize("config", [
    _full(),
    RunConfig(),
    RunConfig(model=ModelConfig("tiny", layers=3, dim=48, heads=3),
              mesh=Mesh(pp=3), batch=BatchConfig(global_batch=8, micro_batch_size=1)),
    RunConfig(model=ModelConfig("py:mypkg.models:build", split=("embed", "blocks", "head")),
              schedule=ScheduleConfig("zb-v", num_chunks=2, num_microbatches=4),
              batch=BatchConfig(global_batch=4, micro_batch_size=1), training=TrainingConfig(
                  lr=1e-4)),
], ids=["full", "defaults", "tiny", "py"])
def test_toml_round_trip_gives_an_equal_config(config: RunConfig, tmp_path: Path) -> None:
    text = config.to_toml()
    tomllib.loads(text)  # the standard library reads what we write by hand
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    assert load_run_config(path) == config
    assert parse_run_config(text).to_toml() == text


def test_file_is_readable_and_hf_config_is_a_plain_dict() -> None:
    config = _full()
    text = config.to_toml()
    assert "[model.hf_config]" in text
    assert "[source]" in text
    assert "num_chunks = 2  # v, chunks (virtual stages) per pipeline rank" in text
    loaded = parse_run_config(text)
    assert type(loaded.model.hf_config) is dict
    assert loaded.model.hf_config == LLAMA
    assert loaded.world_size == 8


def test_train_args() -> None:
    assert _full().train_args() == [
        "--mesh", "pp=2,dp=2,tp=2", "--schedule", "interleaved-1f1b", "--chunks", "2",
        "--microbatches", "8", "--global-batch", "32", "--seq-len", "64", "--steps", "20",
        "--lr", "0.003", "--model", "hf:llama", "--recompute",
    ]
    # tiny GPT: train's default --model is left out, its sizes are flags; fixed-v schedules
    # take no --chunks; --model-config only when the caller has written the HF config.
    tiny = RunConfig(mesh=Mesh(pp=2, dp=1), schedule=ScheduleConfig("zb-v", 2, 4),
                     batch=BatchConfig(4, 1, 16), model=ModelConfig(layers=4))
    assert tiny.train_args() == [
        "--mesh", "pp=2,dp=1", "--schedule", "zb-v", "--microbatches", "4", "--global-batch", "4",
        "--seq-len", "16", "--steps", "30", "--lr", "0.003", "--dim", "64", "--layers", "4",
    ]
    assert _full().train_args("cfg.json")[-3:] == ["--model-config", "cfg.json", "--recompute"]
    two_heads = RunConfig(model=ModelConfig(dim=32, heads=2)).train_args()
    assert two_heads[-6:] == ["--dim", "32", "--layers", "6", "--heads", "2"]


def test_missing_keys_take_trains_defaults() -> None:
    config = parse_run_config(
        '[mesh]\ndp = 2\n[schedule]\nname = "interleaved-1f1b"\nnum_microbatches = 4\n'
        "[batch]\nglobal_batch = 24\n"
    )
    assert config.mesh == Mesh(pp=4, dp=2)  # train's 4 pipeline ranks
    assert config.schedule.num_chunks == 2  # interleaved's default v, as train's -v default
    assert config.batch.micro_batch_size is None  # each replica's 12 rows split evenly
    assert (config.training.steps, config.training.lr, config.model.spec) == (30, 3e-3, "tiny")
    assert (config.model.layers, config.model.dim, config.model.heads) == (6, 64, 4)


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist: write one with stagewise plan"):
        load_run_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_run_config(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[mesh\npp = 2\n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML.*line 1"):
        load_run_config(bad)


@pytest.mark.parametrize(("text", "message"), [
    ("[meshes]\npp = 2", r"unknown section \[meshes\]: the sections are \[mesh\], \[schedule\]"),
    ("[mesh]\npipeline = 2", r"unknown key 'pipeline' in \[mesh\]: the keys are pp, dp, tp"),
    ("[model]\nhf = 1", r"unknown key 'hf' in \[model\]: the keys are spec, layers"),
    ("mesh = 2", r"mesh must be a \[mesh\] section"),
    ('[batch]\nseq_len = "64"', r"\[batch\] seq_len must be an integer, got '64' \(str\): "
     r"write seq_len = 2"),
    ("[mesh]\npp = 2.0", r"\[mesh\] pp must be an integer, got 2.0"),
    ("[mesh]\ntp = true", r"\[mesh\] tp must be an integer, got True"),
    ('[training]\nlr = "fast"', r"\[training\] lr must be a number"),
    ("[model]\nhf_config = 3", r"\[model\] hf_config must be a table"),
    ('[source]\nnotes = "x"', r"\[source\] notes must be a list"),
])
def test_unknown_names_and_wrong_types(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_run_config(text)


@pytest.mark.parametrize(("text", "message"), [
    ("[mesh]\ndp = 0", r"mesh axis dp=0: every axis size must be an integer >= 1"),
    ("[mesh]\ndp = 4\n[batch]\nglobal_batch = 30",
     r"global batch 30 does not split evenly over dp=4 replicas: use a multiple of 4"),
    ("[mesh]\ndp = 2\n[batch]\nglobal_batch = 14",
     r"each of the dp=2 replicas gets 7 sequences, fewer than the 8 micro-batches"),
    ("[mesh]\ndp = 2\n[batch]\nglobal_batch = 30\nmicro_batch_size = 2",
     r"global_batch = 30 is not micro_batch_size x num_microbatches x dp = 2 x 8 x 2 = 32: "
     r"set global_batch = 32"),
    ("[mesh]\npp = 4\n[schedule]\nname = \"interleaved-1f1b\"\nnum_chunks = 2\n"
     "[batch]\nglobal_batch = 8\n[model]\nlayers = 5",
     r"pp x num_chunks = 4 x 2 = 8 stages but the model has 7 layers \(5 blocks, the "
     r"embedding and the head\): lower \[mesh\] pp"),
    ("[mesh]\npp = 4\n[schedule]\nname = \"interleaved-1f1b\"\n[batch]\nglobal_batch = 8\n"
     "[model]\nspec = \"hf:llama\"\n[model.hf_config]\nnum_hidden_layers = 2",
     r"8 stages but the model has 4 layers"),
    ("[mesh]\ntp = 4\n[model]\nspec = \"hf:llama\"\n[model.hf_config]\n"
     "num_attention_heads = 8\nnum_key_value_heads = 2",
     r"tp = 4 does not divide the model's 2 key/value heads: choose a tp that divides 2"),
    ("[mesh]\ntp = 3", r"tp = 3 does not divide the model's 4 attention heads"),
    ("[batch]\nseq_len = 256\n[model]\nspec = \"hf:gpt2\"\n[model.hf_config]\n"
     "n_positions = 128", r"seq_len = 256 is longer than the model's 128 positions"),
    ('[schedule]\nname = "zb-v"\nnum_chunks = 3', r"zb-v runs exactly 2 chunk\(s\) per "
     r"rank: set num_chunks = 2"),
    ('[mesh]\npp = 4\n[schedule]\nname = "dualpipev"\nnum_microbatches = 3\n[batch]\n'
     "global_batch = 3", r"\[schedule\] with \[mesh\] pp = 4: dualpipev needs at least 2p = 8 "
     r"micro-batches"),
    ('[schedule]\nname = "one-f-one-b"', r"'one-f-one-b' is not a schedule: choose one of "
     r"gpipe, 1f1b"),
    ('[training]\nrecompute = "selective"', r"recompute = 'selective': choose one of 'none', "
     r"'full'"),
    ("[training]\nlr = -1.0", r"lr must be a positive number"),
    ("[training]\nlr = nan", r"lr must be a positive number"),
    ('[training]\npartition = "random"', r"partition = 'random': choose one of 'even'"),
    ('[launch]\ndevice = "tpu"', r"device = 'tpu': choose one of 'cpu', 'cuda'"),
    ("[launch]\ntimeout = 0", r"timeout must be > 0 seconds"),
    ("[checkpoint]\nsave_every = 2", r"saving or resuming checkpoints needs a folder"),
    ("[checkpoint]\ndir = \"c\"\nkeep = 0", r"--keep must be >= 1 checkpoints"),
    ("[schedule]\nchunks = 1\nnum_chunks = 1", r"gives both chunks and num_chunks"),
    ("[training]\nsteps = 1", r"steps = 1: stagewise train needs steps >= 2"),
    ('[model]\nspec = "llama"', r"spec = 'llama' is not a local folder, nor \"tiny\", "
     r"\"hf:llama\""),
    ('[model]\nspec = "hf:llama"\nlayers = 4', r"layers apply to spec = \"tiny\" only"),
    ('[model]\nspec = "tiny"\n[model.hf_config]\nhidden_size = 8',
     r"hf_config\] applies to hf: models only"),
    ("[model]\ndim = 60\nheads = 8", r"dim = 60 is not a multiple of heads = 8"),
])
def test_impossible_values(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_run_config(text)


def test_values_toml_cannot_hold_are_refused_on_construction() -> None:
    with pytest.raises(ConfigError, match=r"rope_scaling is None, which TOML cannot hold"):
        ModelConfig("hf:llama", hf_config={"rope_scaling": None})
    with pytest.raises(ConfigError, match=r"cannot be written as TOML"):
        ModelConfig("hf:llama", hf_config={"dtype": object()})


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[mesh]\npp = 0\n")
    with pytest.raises(ConfigError, match=r"run.toml: mesh axis pp=0: every axis size must be"):
        load_run_config(path)


@pytest.mark.multiproc
def test_import_pulls_in_no_torch() -> None:
    code = "import sys, stagewise.runconfig; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.multiproc
def test_planned_config_trains_with_stagewise_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """plan --emit-config run.toml -> train --config run.toml: the run is the file's."""
    pytest.importorskip("transformers")
    path = tmp_path / "run.toml"
    assert cli(["plan", "--model", "tiny-llama", "--gpu", "cpu", "--gpus", "2", "--pp", "2",
                "--seq", "16", "--global-batch", "4", "--micro-batch-size", "1",
                "--emit-config", str(path), "--steps", "2"]) == 0
    config = load_run_config(path)
    capsys.readouterr()
    assert cli(["train", "--config", str(path), "--no-plots", "--json", "--timeout", "60"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["schedule"] == config.schedule.name
    assert report["num_ranks"] == config.mesh.pp
    assert report["num_stages"] == config.mesh.pp * (config.schedule.num_chunks or 1)
    assert report["num_microbatches"] == config.schedule.num_microbatches
    assert len(report["losses"]) == config.training.steps
    # Random weights start near ln(vocab): the emitted vocabulary (256), not the runtime's
    # small default (64, ln 64 = 4.2), reached the model.
    assert config.model.hf_config["vocab_size"] == 256
    assert abs(report["losses"][0] - math.log(256)) < 0.5


_SCALARS = (st.text(max_size=12) | st.booleans() | st.integers(-(2**63), 2**63 - 1)
            | st.floats(allow_nan=False))
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(fields=st.dictionaries(st.text(min_size=1, max_size=10), _VALUES, max_size=6),
       lr=st.floats(min_value=1e-12, max_value=1e3), steps=st.integers(2, 10**9))
def test_any_hf_config_round_trips(fields: dict[str, Any], lr: float, steps: int) -> None:
    config = RunConfig(model=ModelConfig("hf:llama", hf_config=fields),
                       training=TrainingConfig(steps=steps, lr=lr))
    assert parse_run_config(config.to_toml()) == config


def _from_command_line(argv: list[str]) -> RunConfig:
    """The RunConfig ``stagewise train argv`` would run (parsed, nothing launched)."""
    from stagewise.cli._train_flags import run_config

    args = build_parser(["train", *argv]).parse_args(["train", *argv])
    return run_config(args, torchrun=False)


@pytest.mark.parametrize("config", [RunConfig(model=ModelConfig(layers=4, dim=32)),
                                    RunConfig(model=ModelConfig(layers=4, dim=32, heads=2)),
                                    RunConfig(mesh=Mesh(pp=2, dp=2),
                                              schedule=ScheduleConfig("interleaved-1f1b", 2, 4),
                                              batch=BatchConfig(16, None, 8))],
                         ids=["tiny", "tiny-2-heads", "interleaved-dp"])
def test_file_and_flags_give_one_config(config: RunConfig, tmp_path: Path) -> None:
    """train --config FILE, and train with the flags train_args() writes, run one RunConfig."""
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml(), encoding="utf-8")
    assert _from_command_line(["--config", str(path)]) == config
    assert _from_command_line(config.train_args()) == config
    # A flag beside the file overrides that one value only.
    stepped = _from_command_line(["--config", str(path), "--steps", "7"])
    assert stepped == config.override({"training": {"steps": 7}})


def test_old_schedule_keys_still_load_with_a_deprecation_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = parse_run_config('[schedule]\nname = "interleaved-1f1b"\nchunks = 2\n'
                              "microbatches = 4\n")
    assert (config.schedule.num_chunks, config.schedule.num_microbatches) == (2, 4)
    err = capsys.readouterr().err
    assert "[schedule] chunks is deprecated; write num_chunks" in err
    assert "[schedule] microbatches is deprecated; write num_microbatches" in err


def test_a_run_file_can_say_fsdp(tmp_path: Path) -> None:
    config = RunConfig(mesh=Mesh(pp=2, dp=2, dp_shard=True))
    text = config.to_toml()
    assert "dp_shard = true" in text
    assert parse_run_config(text).mesh == Mesh(pp=2, dp=2, dp_shard=True)
    assert config.train_args()[:2] == ["--mesh", "pp=2,fsdp=2"]
