"""``stagewise plan``: the lesson's numbers, --json fields, exports, the picture, bad input."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from stagewise.cli.main import build_parser, cli
from stagewise.plan import catalog_models, get_model, hf_family_and_config, model_from_hf_config
from stagewise.runconfig import RunConfig, load_run_config

LESSON = ["plan", "--model", "llama-2-70b", "--gpu", "H100", "--seq-len", "4096",
          "--global-batch", "64"]
REQUIRED = {"tp", "pp", "dp", "num_chunks", "micro_batch_size", "recompute", "schedule", "fits",
            "memory_gib", "step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu"}


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    assert cli(argv) == 0
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


@pytest.mark.slow
def test_lesson_one_node_does_not_fit_and_says_what_would(
    capsys: pytest.CaptureFixture[str],
) -> None:
    doc = _json(capsys, [*LESSON, "--nodes", "1", "--gpus-per-node", "8", "--json",
                         "--claim-steps-per-s", "1.85"])
    assert doc["fitting"] == 0
    assert doc["recommended"] is None
    for plan in doc["plans"]:
        assert plan.keys() >= REQUIRED
        assert not plan["fits"]
        assert "GiB" in plan["reason"]
        # Full training needs 18 bytes per parameter: 69e9 x 18 / 8 GPUs > 80 GB.
        assert plan["memory_gib"]["total"] > 140
    changes = " | ".join(s["change"] for s in doc["what_would_fit"])
    assert "2 nodes" in changes
    assert "LoRA" in changes
    more_nodes = doc["what_would_fit"][0]["plan"]
    assert more_nodes["fits"]
    assert more_nodes["tp"] * more_nodes["pp"] * more_nodes["dp"] == 16
    claim = doc["claim"]
    assert not claim["possible"]
    assert claim["lower_bound_step_s"] > 13
    assert claim["claimed_step_s"] == pytest.approx(1 / 1.85)


@pytest.mark.slow
def test_lesson_four_nodes_recommends_compares_layouts_and_emits_the_run_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plot, run = tmp_path / "plans.png", tmp_path / "run.toml"
    doc = _json(capsys, [*LESSON, "--nodes", "4", "--gpus-per-node", "8", "--json", "--top", "5",
                         "--layouts", "8x1,2x4,4x2", "--megatron", "--torchtitan",
                         "--tokens", "1e9", "--price-per-gpu-hour", "2.5",
                         "--plot", str(plot), "--emit-config", str(run), "--steps", "12",
                         "--lr", "1e-4"])
    _check_emitted_70b(doc, run)  # one search for both (this machine is slow)
    best = doc["recommended"]
    assert best["fits"]
    assert best["tp"] * best["pp"] * best["dp"] == 32
    assert best["megatron"].startswith("torchrun --nnodes 4 --nproc-per-node 8 pretrain_gpt.py")
    assert "[parallelism]" in best["torchtitan"]
    assert best["run_hours"] == pytest.approx(1e9 / best["tokens_per_s"] / 3600)
    assert best["run_cost"] == pytest.approx(best["run_hours"] * 32 * 2.5)
    assert len(doc["plans"]) == 5
    assert all(p.keys() >= REQUIRED for p in doc["plans"])
    steps = [p["step_time_s"] for p in doc["plans"]]
    assert steps == sorted(steps)
    assert doc["plans"][0]["step_time_s"] == best["step_time_s"]
    layouts = [(p["tp"], p["pp"]) for p in doc["best_per_layout"]]
    assert layouts == [(8, 1), (2, 4), (4, 2)]
    for plan in doc["best_per_layout"]:
        assert plan["step_time_s"] >= best["step_time_s"]
        parts = plan["memory_gib"]
        total = sum(v for k, v in parts.items() if k != "total")
        assert parts["total"] == pytest.approx(total)
    assert plot.stat().st_size > 10_000


def test_text_output_names_the_flop_count_and_both_bubble_fractions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["plan", "--model", "llama-2-7b", "--gpu", "a100", "--gpus", "8", "--seq-len", "2048",
            "--global-batch", "16", "--tp", "2", "--pp", "2", "--micro-batch-size", "1",
            "--recompute", "none", "--sequence-parallel", "--schedule", "1f1b",
            "--distributed-optimizer"]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "recommended:" in out
    assert "TP=2 PP=2 DP=2" in out
    assert "model FLOPs" in out
    assert "of the step idle" in out
    assert "relative to ideal" in out


def test_model_from_hf_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
        "num_attention_heads": 32, "num_hidden_layers": 32, "vocab_size": 32000,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "rope_scaling": None, "architectures": ["LlamaForCausalLM"],
        "quantization": {"bits": 8, "group": None},
    }))
    run = tmp_path / "run.toml"
    doc = _json(capsys, ["plan", "--model-config", str(config), "--gpu", "h100", "--nodes", "1",
                         "--gpus-per-node", "8", "--seq-len", "4096", "--global-batch", "8",
                         "--tp", "8", "--pp", "1", "--json", "--emit-config", str(run)])
    assert doc["num_params"] == 6_738_415_616  # Llama-2-7B's published count
    # The emitted model keeps the file's other fields (nulls dropped: TOML has none).
    fields = load_run_config(run).model.hf_config
    assert fields["rms_norm_eps"] == 1e-05
    assert fields["rope_theta"] == 10000.0
    assert fields["architectures"] == ["LlamaForCausalLM"]
    assert "rope_scaling" not in fields
    assert fields["quantization"] == {"bits": 8}
    assert "model_type" not in fields
    assert fields["num_key_value_heads"] == 32  # the planned shape, filled in


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gpu", "H1000", "--nodes", "1"], "unknown GPU 'H1000'"),
        (["--gpu", "H100", "--nodes", "1", "--tp", "3"], "does not divide"),
        (["--gpu", "H100", "--nodes", "1", "--tp", "8", "--pp", "1", "--dp", "1",
          "--micro-batch-size", "3"], "not a multiple of dp x micro-batch size"),
        (["--model", "gpt-3-175b", "--gpu", "H100", "--nodes", "2", "--tp", "16"],
         "spans nodes"),
        (["--gpu", "H100"], "--nodes"),
        (["--gpu", "H100", "--nodes", "1", "--schedule", "zigzag"], "unknown schedule"),
        (["--gpu", "H100", "--nodes", "1", "--lora", "0"], "--lora"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["plan", "--model", "llama-2-70b", "--seq-len", "4096", "--global-batch", "64", *extra]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("stagewise: error:")
    assert message in err


def test_planner_imports_neither_torch_nor_matplotlib() -> None:
    code = (
        "import sys, stagewise.plan, stagewise.cli.plan, stagewise.plan.plot, "
        "stagewise.plan.advice; "
        "print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"]


# --- plan --emit-config: the planner's choice as a run configuration for stagewise train ---

TOY = ["plan", "--model", "tiny-llama", "--gpu", "cpu", "--nodes", "1", "--gpus-per-node", "8",
       "--seq-len", "32", "--global-batch", "16"]


def _assert_config_is_the_plan(config: RunConfig, plan: dict[str, Any], seq: int) -> None:
    """Every knob of the emitted file equals the plan's own JSON."""
    assert (config.mesh.pp, config.mesh.dp, config.mesh.tp) == (plan["pp"], plan["dp"], plan["tp"])
    assert config.schedule.name == plan["schedule"]
    assert config.schedule.num_chunks == plan["num_chunks"]
    assert config.schedule.num_microbatches == plan["num_microbatches"]
    assert config.batch.micro_batch_size == plan["micro_batch_size"]
    assert config.batch.seq_len == seq
    assert config.training.recompute == plan["recompute"]
    assert config.source is not None
    assert config.source.predicted_step_s == pytest.approx(plan["step_time_s"], rel=1e-5)
    assert config.source.memory_per_gpu_gib == pytest.approx(plan["memory_gib"]["total"],
                                                             abs=1e-3)


def _check_emitted_70b(doc: dict[str, Any], path: Path) -> None:
    """--emit-config for Llama-2-70B on 4 x 8 H100 wrote the recommended plan."""
    config = load_run_config(path)
    _assert_config_is_the_plan(config, doc["recommended"], doc["seq_len"])
    assert config.batch.global_batch == doc["global_batch"]
    assert config.world_size == doc["nodes"] * doc["gpus_per_node"]
    assert config.mesh.tp <= doc["gpus_per_node"]  # TP inside a node
    assert (config.training.steps, config.training.lr) == (12, 1e-4)
    family, fields = hf_family_and_config(get_model(doc["model"]))
    assert config.model.spec == f"hf:{family}" == "hf:llama"
    assert config.model.hf_config == fields
    assert fields["num_hidden_layers"] == get_model("llama-2-70b").layers
    emitted = doc["run_config"]
    assert emitted["path"] == str(path)
    assert emitted["world_size"] == config.world_size
    assert emitted["train_args"] == config.train_args()
    assert config.source is not None
    assert config.source.model == "llama-2-70b"


def _parse_train(config: RunConfig) -> argparse.Namespace:
    """Parse ``stagewise train`` + the config's flags with the train verb's own parser."""
    argv = ["train", *config.train_args()]
    parsed, unknown = build_parser(argv).parse_known_args(argv)
    assert not unknown, f"stagewise train does not take {unknown}"
    return parsed


@pytest.mark.parametrize("knobs", [[], ["--pp", "2", "--tp", "2", "--recompute", "full"]],
                         ids=["searched", "pp2-tp2-full"])
def test_toy_plan_on_cpu_emits_a_config_train_parses(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, knobs: list[str]
) -> None:
    path = tmp_path / "run.toml"
    doc = _json(capsys, [*TOY, *knobs, "--json", "--emit-config", str(path)])
    best = doc["recommended"]
    config = load_run_config(path)
    _assert_config_is_the_plan(config, best, 32)
    assert config.world_size == 8
    assert config.model.spec == "hf:llama"
    assert config.model.hf_config["hidden_size"] == 64
    if knobs:
        assert (config.mesh.pp, config.mesh.tp, config.training.recompute) == (2, 2, "full")
    parsed = _parse_train(config)
    assert parsed.mesh == config.mesh.text()
    assert (parsed.schedule, parsed.microbatches) == (best["schedule"], best["num_microbatches"])
    assert (parsed.global_batch, parsed.seq_len) == (16, 32)
    assert (parsed.steps, parsed.lr) == (30, 3e-3)
    assert parsed.model == "hf:llama"
    assert bool(parsed.recompute) == (best["recompute"] == "full")
    if config.schedule.takes_chunks:
        assert parsed.chunks == best["num_chunks"]
    # The flags make the file's run (the HF config has no flag: --model-config carries it).
    from stagewise.cli._train_flags import run_config

    from_flags = run_config(parsed, torchrun=False)
    expected = replace(config.override({"batch": {"micro_batch_size": None}}), source=None)
    assert from_flags.override({"model": {"hf_config": config.model.hf_config}}) == expected


def test_toy_option_keeps_the_layout_and_shrinks_the_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "toy.toml"
    doc = _json(capsys, [*LESSON, "--nodes", "4", "--gpus-per-node", "8", "--json", "--top", "1",
                         "--tp", "4", "--pp", "4", "--emit-config", str(path), "--toy"])
    config = load_run_config(path)
    _assert_config_is_the_plan(config, doc["recommended"], 32)  # sequences cut to 32 tokens
    hf = config.model.hf_config
    assert config.schedule.num_chunks is not None
    stages = config.mesh.pp * config.schedule.num_chunks
    assert hf["num_hidden_layers"] == max(2, stages)
    assert hf["hidden_size"] <= 128
    assert hf["num_attention_heads"] % config.mesh.tp == 0
    assert hf["num_key_value_heads"] % config.mesh.tp == 0
    assert hf["num_key_value_heads"] < hf["num_attention_heads"]  # grouped-query, as 70B
    assert config.source is not None
    assert config.source.notes[0].startswith("toy run")


def test_emit_config_text_output_says_where_it_wrote(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "run.toml"
    assert cli([*TOY, "--pp", "2", "--emit-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {path}: run of TP=" in out
    assert f"stagewise train --config {path}" in out
    assert load_run_config(path).mesh.pp == 2


@pytest.mark.parametrize(("argv", "message"), [
    ([*LESSON, "--nodes", "1", "--gpus-per-node", "8", "--tp", "8"], "nothing fits"),
    ([*TOY, "--recompute", "selective"], "recomputes whole layers only"),
    ([*LESSON, "--nodes", "4", "--model", "gpt2-xl", "--tp", "1", "--pp", "1"], None),
])
def test_emit_config_refuses_what_it_cannot_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], message: str | None
) -> None:
    path = tmp_path / "run.toml"
    code = cli([*argv, "--emit-config", str(path)])
    if message is None:  # GPT-2 shapes are emitted as hf:gpt2
        config = load_run_config(path)
        assert code == 0
        assert config.model.spec == "hf:gpt2"
        assert config.model.hf_config["n_positions"] == 4096  # gpt2-xl's 1024 raised to seq
        return
    assert code == 2
    assert not path.exists()
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_toy_without_emit_config_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli([*TOY, "--toy"]) == 2
    assert "add --emit-config" in capsys.readouterr().err


@pytest.mark.parametrize("name", catalog_models())
def test_emitted_hf_config_rebuilds_the_planned_model(name: str) -> None:
    """hf_family_and_config is the inverse of the planner's own Hugging Face reader."""
    planned = get_model(name)
    family, fields = hf_family_and_config(planned)
    rebuilt = model_from_hf_config({"model_type": family, **fields}, name=name)
    keep = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "mlp", "norm",
            "tied_embeddings", "position", "bias", "dropout", "max_seq_len")
    assert {k: getattr(rebuilt, k) for k in keep} == {k: getattr(planned, k) for k in keep}
    assert rebuilt.num_params == planned.num_params


@pytest.mark.parametrize(("old", "new"), [("--seq", "--seq-len"), ("--vp", "--num-chunks")])
def test_old_flag_spellings_work_with_a_deprecation_message(
    capsys: pytest.CaptureFixture[str], old: str, new: str
) -> None:
    argv = ["plan", "--model", "llama-2-7b", "--gpu", "h100", "--gpus", "8", "--global-batch",
            "16", "--tp", "2", "--pp", "2", "--schedule", "interleaved-1f1b", "--json"]
    values = {"--seq-len": "2048", "--num-chunks": "2"}
    old_argv = [*argv, old, values[new], *(a for f, v in values.items() if f != new
                                            for a in (f, v))]
    new_argv = [*argv, *(a for f, v in values.items() for a in (f, v))]
    assert cli(old_argv) == 0
    captured = capsys.readouterr()
    assert f"{old} is deprecated; use {new}" in captured.err
    assert json.loads(captured.out)["recommended"] == _json(capsys, new_argv)["recommended"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--tokens=-1e9"], "--tokens must be > 0, got -1e"),
    (["--tokens", "1e9", "--price-per-gpu-hour=-2"], "--price-per-gpu-hour must be > 0"),
    (["--price-per-gpu-hour", "2"], "whose length comes from --tokens: add --tokens"),
    (["--memory-margin-gib=-1"], "--memory-margin-gib must be >= 0"),
])
def test_meaningless_budgets_are_refused(
    capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert cli([*LESSON, "--nodes", "1", *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_launch_line_for_a_plan_that_does_not_fit_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 70B on one node of 8 H100 never fits (lesson): the closest plan's line carries a warning.
    assert cli([*LESSON, "--nodes", "1", "--megatron"]) == 0
    out = capsys.readouterr().out
    warning = out.index("# note: this plan does NOT fit")
    assert warning < out.index("pretrain_gpt.py")


def test_memory_margin_marks_plans_at_risk(capsys: pytest.CaptureFixture[str]) -> None:
    fixed = ["--tp", "8", "--pp", "4", "--micro-batch-size", "1", "--recompute", "none",
             "--schedule", "1f1b", "--no-sequence-parallel", "--dp-sharding", "none", "--json"]
    plan = _json(capsys, [*LESSON, "--nodes", "4", *fixed])["recommended"]
    free = plan["memory_limit_gib"] - plan["memory_gib"]["total"]
    assert plan["headroom_gib"] == pytest.approx(free, abs=1e-9)
    assert plan["at_risk"] is False or free < 2.0
    wide = _json(capsys, [*LESSON, "--nodes", "4", *fixed, "--memory-margin-gib",
                          str(free + 0.5)])["recommended"]
    assert wide["at_risk"] is True
    narrow = _json(capsys, [*LESSON, "--nodes", "4", *fixed, "--memory-margin-gib",
                            str(max(free - 0.5, 0.0))])["recommended"]
    assert narrow["at_risk"] is False


def test_memory_margin_is_said_in_the_text_and_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Issue 14 item 6: a plan within the margin (default 2 GiB) of the limit is marked at risk.
    fixed = ["--tp", "8", "--pp", "4", "--micro-batch-size", "1", "--recompute", "none",
             "--schedule", "1f1b", "--no-sequence-parallel", "--dp-sharding", "none"]
    plan = _json(capsys, [*LESSON, "--nodes", "4", *fixed, "--json"])["recommended"]
    free = plan["headroom_gib"]
    assert free > 0
    assert cli([*LESSON, "--nodes", "4", *fixed, "--memory-margin-gib", str(free + 1)]) == 0
    risky = capsys.readouterr().out
    assert f"at risk: only {free:.1f} GiB free at the peak (margin {free + 1:g} GiB)" in risky
    assert "at risk" in risky.split("top ")[-1]  # the table's note column
    assert cli([*LESSON, "--nodes", "4", *fixed, "--memory-margin-gib", "0"]) == 0
    assert "at risk" not in capsys.readouterr().out


# Issue 14 item 2: 8 blocks over 4 stages with a 256k vocabulary; the head outweighs a block,
# so the edges split (1, 3, 3, 1) beats the balanced one (tests/test_plan_layer_split.py).
EDGES_CASE = ["plan", "--layers", "8", "--hidden", "1024", "--heads", "16", "--ffn", "4096",
              "--vocab", "256000", "--gpu", "H100", "--gpus", "4", "--seq-len", "1024",
              "--global-batch", "16", "--tp", "1", "--pp", "4", "--micro-batch-size", "1",
              "--recompute", "none", "--schedule", "1f1b"]


def test_layer_split_is_searched_and_said_in_json_and_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    doc = _json(capsys, [*EDGES_CASE, "--json"])
    assert sorted(p["layer_split"] for p in doc["plans"]) == ["balanced", "edges"]
    best = doc["recommended"]
    assert (best["layer_split"], best["layers_per_stage"]) == ("edges", [1, 3, 3, 1])
    assert cli(EDGES_CASE) == 0
    out = capsys.readouterr().out
    assert "edges-split" in out.split("top ")[0]  # the recommendation
    rows = out.split("top ")[-1].splitlines()[2:4]
    assert rows[0].endswith("edges split")  # the table's note column
    assert "split" not in rows[1]


@pytest.mark.parametrize(("split", "layers"), [("balanced", [2, 2, 2, 2]),
                                                ("edges", [1, 3, 3, 1])])
def test_layer_split_flag_fixes_the_knob(
    capsys: pytest.CaptureFixture[str], split: str, layers: list[int]
) -> None:
    doc = _json(capsys, [*EDGES_CASE, "--layer-split", split, "--json"])
    assert [(p["layer_split"], p["layers_per_stage"]) for p in doc["plans"]] == [(split, layers)]


def test_unknown_layer_split_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli([*EDGES_CASE, "--layer-split", "ends"]) == 2
    assert "--layer-split" in capsys.readouterr().err
