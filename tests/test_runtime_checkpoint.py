"""Checkpoints: kill and resume with identical losses, resume onto another layout, interrupted
writes, clear errors.

The multi-process runs train the tiny GPT with AdamW (``verify_checkpoint.train_run``); step
``s``'s batch depends on the seed and ``s`` alone. The uninterrupted 2-rank 1F1B run is the
reference for exact equality after a resume under the same layout, and is itself checked
against the whole model trained in this one process; a resume under another layout is
compared to the checkpoint's tensors and, for the losses, to the uninterrupted run with a
tolerance (other layouts add in another order).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from stagewise.errors import ConfigError, RuntimeFailure

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from stagewise.runtime.checkpoint.state import (  # noqa: E402
    latest_checkpoint,
    load_checkpoint,
    rank_layers,
    save_checkpoint,
)
from stagewise.runtime.engine.launch import launch  # noqa: E402
from stagewise.runtime.models.tiny_gpt import gpt_layers, lm_loss  # noqa: E402
from workers.checkpoint import (  # noqa: E402
    CONFIG,
    LR,
    Run,
    batch,
    snapshot,
    train_run,
)

STEPS = 6


def _merge(results: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Every rank's snapshot ``key`` ("loaded" or "final") in one, by layer-keyed name."""
    merged: dict[str, dict[str, Any]] = {"params": {}, "optim": {}}
    for result in results:
        for part in ("params", "optim"):
            merged[part].update(result[key][part])
    return merged


def _losses(results: list[dict[str, Any]]) -> dict[int, float]:
    losses: dict[int, float] = {}
    for result in results:
        losses.update(result["losses"])
    return losses


def _assert_equal(got: dict[str, dict[str, Any]], want: dict[str, dict[str, Any]]) -> None:
    for part in ("params", "optim"):
        assert sorted(got[part]) == sorted(want[part])
        for name, tensor in want[part].items():
            assert torch.equal(got[part][name], tensor), f"{part} {name} differs"


# float32 losses arrive as Python floats, which assert_close would hold to float64's 1e-7.
# Another process layout sums in another order: torch's float32 tolerances, widened tenfold
# for the few ulps a handful of AdamW steps add (seen: 4.8e-7 on another CPU).
LOSS = {"rtol": 1e-5, "atol": 1e-6}
# A resume onto another stage cut also reorders the optimizer's sums over more steps.
OTHER_LAYOUT = {"rtol": 1e-4, "atol": 1e-5}

@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One intra-op thread in this process: on a busy machine, torch's spinning worker threads
    make the tiny in-process runs 10-100 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, Any]:
    """The 2-rank 1F1B run of STEPS steps, no checkpoints: losses by step, final snapshot."""
    results = launch(train_run, 2, (Run(steps=STEPS),), timeout=120)
    return {"losses": _losses(results), "final": _merge(results, "final")}


@pytest.fixture(scope="module")
def saved_pp2_dp2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A checkpoint of step 4 written by pp=2 x dp=2 (4 ranks), and the state it holds."""
    folder = tmp_path_factory.mktemp("pp2dp2")
    run = Run(steps=4, pp=2, dp=2, folder=str(folder), save_every=4)
    results = launch(train_run, 4, (run,), timeout=120)
    return {"folder": folder, "final": _merge(results, "final")}


@pytest.mark.multiproc
def test_uninterrupted_run_matches_one_process(uninterrupted: dict[str, Any]) -> None:
    model = nn.Sequential(*gpt_layers(CONFIG, seed=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    for step in range(STEPS):
        inputs, targets = batch(0, step)
        loss = lm_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        # Pipelined vs one process: float32 sums in another order, so a stated tolerance.
        torch.testing.assert_close(uninterrupted["losses"][step + 1], loss.item(), **LOSS)
    assert uninterrupted["losses"][STEPS] < uninterrupted["losses"][1]


@pytest.mark.multiproc
def test_killed_run_resumes_with_identical_losses(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    folder = str(tmp_path)
    with pytest.raises(RuntimeFailure, match="rank 1 was killed by SIGKILL"):
        launch(train_run, 2, (Run(steps=STEPS, folder=folder, save_every=2, die_after=4,
                                  keep=2),), timeout=120, grace=3)
    assert latest_checkpoint(folder) == tmp_path / "step-00000004"
    _fake(tmp_path, "step-00000006.partial", json.dumps({"step": 6}))  # a save cut short
    resumed = launch(train_run, 2, (Run(steps=STEPS, folder=folder, save_every=2, resume=True,
                                        keep=2),), timeout=120)
    assert [r["start"] for r in resumed] == [4, 4]
    # The last stage's rank (1) wrote the extra: the losses of steps 1-4.
    before = {s: uninterrupted["losses"][s] for s in (1, 2, 3, 4)}
    assert resumed[0]["extra"] == {"seed": 0, "layout": "pp=2,dp=1,tp=1,v=1", "losses": before}
    losses = _losses(resumed)
    assert losses == {s: uninterrupted["losses"][s] for s in (5, 6)}  # exact, not close
    _assert_equal(_merge(resumed, "final"), uninterrupted["final"])
    # The step-6 save replaced the stale partial folder; keep=2 removed step 2.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000006"]


@pytest.mark.multiproc
def test_resume_onto_interleaved_stages_cut_by_params(
    saved_pp2_dp2: dict[str, Any], uninterrupted: dict[str, Any]
) -> None:
    run = Run(steps=STEPS, pp=2, schedule="interleaved-1f1b", chunks=2, method="params",
              folder=str(saved_pp2_dp2["folder"]), resume=True)
    results = launch(train_run, 2, (run,), timeout=120)
    assert {r["start"] for r in results} == {4}
    loaded = _merge(results, "loaded")
    _assert_equal(loaded, saved_pp2_dp2["final"])
    assert {name.split(".")[0] for name in loaded["params"]} == {str(i) for i in range(6)}
    losses = _losses(results)
    assert sorted(losses) == [5, 6]
    for step, loss in losses.items():
        torch.testing.assert_close(loss, uninterrupted["losses"][step], **OTHER_LAYOUT)


@pytest.mark.multiproc
def test_resume_in_one_process_without_a_group(
    saved_pp2_dp2: dict[str, Any], uninterrupted: dict[str, Any]
) -> None:
    model = nn.Sequential(*gpt_layers(CONFIG, seed=2))  # other weights: all must be loaded
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    layers = rank_layers({0: model}, [len(model)])
    path = latest_checkpoint(saved_pp2_dp2["folder"], required=True)
    assert path is not None
    info = load_checkpoint(path, layers, optimizer)
    assert info["step"] == 4
    assert info["extra"]["layout"] == "pp=2,dp=2,tp=1,v=1"
    assert sorted(info["extra"]["losses"]) == [
        1, 2, 3, 4]
    _assert_equal(snapshot(layers, optimizer), saved_pp2_dp2["final"])
    for step in (4, 5):
        inputs, targets = batch(0, step)
        loss = lm_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        torch.testing.assert_close(loss.item(), uninterrupted["losses"][step + 1], **LOSS)


@pytest.mark.multiproc
def test_tensor_parallel_checkpoint_loads_whole_in_one_process(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    run = Run(steps=2, pp=1, tp=2, folder=str(tmp_path), save_every=2)
    results = launch(train_run, 2, (run,), timeout=120)
    saved = _merge(results, "final")
    model = nn.Sequential(*gpt_layers(CONFIG, seed=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    layers = dict(enumerate(model))
    load_checkpoint(tmp_path / "step-00000002", layers, optimizer)
    _assert_equal(snapshot(layers, optimizer), saved)
    inputs, targets = batch(0, 2)
    loss = lm_loss(model(inputs), targets)
    torch.testing.assert_close(loss.item(), uninterrupted["losses"][3], **LOSS)


@pytest.mark.multiproc
def test_save_killed_midway_is_not_taken(tmp_path: Path) -> None:
    folder = str(tmp_path)
    with pytest.raises(RuntimeFailure, match="rank 1 was killed by SIGKILL"):
        launch(train_run, 2, (Run(steps=4, folder=folder, save_every=2, die_in_save=4),),
               timeout=120, grace=3)
    partial = tmp_path / "step-00000004.partial"
    # Every rank's data and DCP's metadata were written; only the marker is missing.
    assert (partial / ".metadata").is_file()
    assert not (partial / "COMPLETE").exists()
    assert latest_checkpoint(folder) == tmp_path / "step-00000002"


def _fake(folder: Path, name: str, marker: str | None, metadata: bool = True) -> None:
    path = folder / name
    path.mkdir()
    (path / "extra.pt").write_bytes(b"")
    if metadata:
        (path / ".metadata").write_bytes(b"")
    if marker is not None:
        (path / "COMPLETE").write_text(marker)


def test_latest_skips_partial_unmarked_and_corrupt(tmp_path: Path) -> None:
    _fake(tmp_path, "step-00000002", json.dumps({"step": 2}))
    _fake(tmp_path, "step-00000003", json.dumps({"step": 3}), metadata=False)
    _fake(tmp_path, "step-00000004.partial", json.dumps({"step": 4}))  # marked, not renamed
    _fake(tmp_path, "step-00000006", None)
    _fake(tmp_path, "step-00000008", '{"step": 8')  # cut short
    _fake(tmp_path, "step-00000010", json.dumps({"step": 12}))  # names another step
    _fake(tmp_path, "step-12", json.dumps({"step": 12}))
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000002"
    # A complete checkpoint named directly is taken as it is; an incomplete one is not.
    assert latest_checkpoint(tmp_path / "step-00000002") == tmp_path / "step-00000002"
    assert latest_checkpoint(tmp_path / "step-00000006") is None
    _fake(tmp_path, "step-00000014", json.dumps({"step": 14}))
    assert latest_checkpoint(tmp_path, required=True) == tmp_path / "step-00000014"


def test_resume_without_a_checkpoint_names_the_folder(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(ConfigError, match=r"does not exist.*drop --resume"):
        latest_checkpoint(tmp_path / "missing", required=True)
    with pytest.raises(ConfigError, match="it is empty"):
        latest_checkpoint(tmp_path, required=True)
    _fake(tmp_path, "step-00000002.partial", None)
    with pytest.raises(ConfigError, match=r"holds only step-00000002\.partial"):
        latest_checkpoint(tmp_path, required=True)
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step-00000002.partial", {})


@pytest.mark.multiproc
@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"dim": 32}, "0.tokens.weight has shape [16, 16] there but [16, 32] in this model"),
        ({"layers": 5}, "has no 5.norm1.weight (layer 5, Block)"),
        ({"layers": 3}, "(layer 4, Head)"),
    ],
    ids=["wider", "deeper", "shallower"],
)
def test_mismatched_model_names_the_first_difference(
    saved_pp2_dp2: dict[str, Any], changes: dict[str, int], words: str
) -> None:
    model = nn.Sequential(*gpt_layers(replace(CONFIG, **changes), seed=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    path = latest_checkpoint(saved_pp2_dp2["folder"], required=True)
    assert path is not None
    with pytest.raises(ConfigError) as info:
        load_checkpoint(path, dict(enumerate(model)), optimizer)
    assert words in str(info.value)


@pytest.mark.multiproc
def test_layers_of_the_checkpoint_nobody_holds_are_refused(saved_pp2_dp2: dict[str, Any]) -> None:
    model = nn.Sequential(*gpt_layers(CONFIG, seed=1))
    path = latest_checkpoint(saved_pp2_dp2["folder"], required=True)
    assert path is not None
    # This one process holds layers 0-4 only: layer 5 of the checkpoint has no home.
    with pytest.raises(ConfigError, match=r"holds 5\.\S+, which no rank's layers have"):
        load_checkpoint(path, dict(enumerate(list(model)[:5])))


def test_one_process_keeps_the_newest_replaces_a_step_and_refuses_an_older_one(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    layers: dict[int, nn.Module] = {0: nn.Linear(3, 3), 1: nn.Linear(3, 2)}
    optimizer = torch.optim.AdamW(nn.ModuleList(layers.values()).parameters(), lr=0.1)

    def train() -> None:
        layers[1](layers[0](torch.ones(2, 3))).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    for step in (1, 2, 3):
        train()
        save_checkpoint(tmp_path, step, layers, optimizer, extra={"at": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]
    train()  # step 3 again (as after resuming from step 2): the new state replaces the old
    save_checkpoint(tmp_path, 3, layers, optimizer, keep=2)
    fresh: dict[int, nn.Module] = {0: nn.Linear(3, 3), 1: nn.Linear(3, 2)}
    fresh_optimizer = torch.optim.AdamW(nn.ModuleList(fresh.values()).parameters(), lr=0.1)
    info = load_checkpoint(tmp_path / "step-00000003", fresh, fresh_optimizer)
    assert info == {"step": 3, "extra": {}}
    _assert_equal(snapshot(fresh, fresh_optimizer), snapshot(layers, optimizer))
    with pytest.raises(ConfigError, match="already holds step-00000003, a later step"):
        save_checkpoint(tmp_path, 2, layers, optimizer)


def test_one_process_no_optimizer_state_is_saved_as_none_and_loaded_as_none(
    tmp_path: Path,
) -> None:
    def model() -> dict[int, nn.Module]:
        return {0: nn.Linear(3, 3), 1: nn.Linear(3, 3)}

    torch.manual_seed(0)
    layers = model()
    optimizer = torch.optim.AdamW(nn.ModuleList(layers.values()).parameters(), lr=0.1)
    save_checkpoint(tmp_path, 0, layers, optimizer)
    assert not optimizer.state  # the save took no (zero-lr) step
    layers[0](torch.ones(2, 3)).sum().backward()  # layer 1 unused: no gradient, no state
    optimizer.step()
    save_checkpoint(tmp_path, 1, layers, optimizer)
    for step, with_state in ((0, 0), (1, 2)):
        fresh = model()
        fresh_optimizer = torch.optim.AdamW(nn.ModuleList(fresh.values()).parameters(), lr=0.1)
        load_checkpoint(tmp_path / f"step-{step:08d}", fresh, fresh_optimizer)
        assert len(fresh_optimizer.state) == with_state
    _assert_equal(snapshot(fresh, fresh_optimizer), snapshot(layers, optimizer))


def test_one_process_optimizer_hyperparameters_and_another_optimizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layers: dict[int, nn.Module] = {0: nn.Linear(3, 3)}
    optimizer = torch.optim.AdamW(layers[0].parameters(), lr=0.1)
    layers[0](torch.ones(2, 3)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 1, layers, optimizer)
    fresh: dict[int, nn.Module] = {0: nn.Linear(3, 3)}
    # The checkpoint's hyperparameters win; one it lacks (a newer option) keeps its value.
    later = torch.optim.AdamW(fresh[0].parameters(), lr=0.5)
    later.param_groups[0]["added_option"] = 7
    load_checkpoint(path, fresh, later)
    assert later.param_groups[0]["lr"] == 0.1
    assert later.param_groups[0]["added_option"] == 7
    assert torch.equal(fresh[0].weight, layers[0].weight)
    other: dict[int, nn.Module] = {0: nn.Linear(3, 3)}
    sgd = torch.optim.SGD(other[0].parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ConfigError, match=r"no optimizer state 0\.\w+\.momentum_buffer"):
        load_checkpoint(path, other, sgd)
    load_checkpoint(path, other)  # the parameters alone
    assert torch.equal(other[0].bias, layers[0].bias)


def test_rank_layers_numbers_layers_across_stages() -> None:
    stages = [nn.Sequential(nn.Linear(2, 2), nn.Tanh()), nn.Sequential(nn.Linear(2, 3))]
    layers = rank_layers({1: stages[1], 0: stages[0]}, [2, 1])
    assert list(layers) == [0, 1, 2]
    assert layers[2] is stages[1][0]
    with pytest.raises(ConfigError, match="gives it 1"):
        rank_layers({0: stages[0]}, [1, 2])
    with pytest.raises(ConfigError, match="outside the cut"):
        rank_layers({2: stages[1]}, [2, 1])


@pytest.mark.multiproc
def _small_run(tmp_path: Path, **checkpoint: Any) -> Any:
    """A checked 2-rank tiny GPT run (``stagewise.train.prepare``) with these checkpoint
    settings; ``steps`` and ``lr`` go to [training]."""
    from stagewise.mesh import Mesh
    from stagewise.runconfig import (
        BatchConfig,
        CheckpointConfig,
        ModelConfig,
        RunConfig,
        ScheduleConfig,
        TrainingConfig,
    )
    from stagewise.train import prepare

    training = {k: checkpoint.pop(k) for k in ("steps", "lr") if k in checkpoint}
    return prepare(RunConfig(
        mesh=Mesh(pp=2), schedule=ScheduleConfig(num_microbatches=2),
        batch=BatchConfig(global_batch=4, seq_len=8),
        training=TrainingConfig(**{"steps": 10, **training}),
        model=ModelConfig(layers=2, dim=16, heads=2),
        checkpoint=CheckpointConfig(dir=str(tmp_path), **checkpoint),
    ))


def test_checkpoint_settings_that_would_fail_in_the_ranks_fail_before_launch(
    tmp_path: Path,
) -> None:
    _fake(tmp_path, "step-00000009", json.dumps({"step": 9}))
    with pytest.raises(ConfigError, match=r"at step 9 of 10: fewer than 2 steps.*above 10"):
        _small_run(tmp_path, resume=True)
    assert _small_run(tmp_path, resume=True, steps=11).config.checkpoint.resume  # 2 steps left
    with pytest.raises(ConfigError, match=r"holds step-00000009.*first save \(step 4\).*--resume"):
        _small_run(tmp_path, save_every=4)
    # saving step 9 again replaces it
    assert _small_run(tmp_path, save_every=9).config.checkpoint.save_every == 9
    with pytest.raises(ConfigError, match="--keep must be >= 1"):
        _small_run(tmp_path, save_every=9, keep=0)


def test_resume_trains_on_with_this_runs_learning_rate(tmp_path: Path) -> None:
    """load_checkpoint restores the saved lr; a resumed ``train --lr X`` must use X."""
    from stagewise.train.loop import resume

    torch.manual_seed(0)
    layers: dict[int, nn.Module] = {0: nn.Linear(3, 3)}
    optimizer = torch.optim.AdamW(layers[0].parameters(), lr=0.1)
    layers[0](torch.ones(2, 3)).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path, 1, layers, optimizer, extra={"losses": [2.5]})
    job = _small_run(tmp_path, steps=4, lr=0.02, resume=True)
    fresh: dict[int, nn.Module] = {0: nn.Linear(3, 3)}
    fresh_optimizer = torch.optim.AdamW(fresh[0].parameters(), lr=0.02)
    assert resume(job, fresh, fresh_optimizer) == (1, [2.5])
    assert fresh_optimizer.param_groups[0]["lr"] == 0.02
    assert torch.equal(fresh[0].weight, layers[0].weight)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1
