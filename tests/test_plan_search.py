"""The search: only valid splits, ranked by step time among those that fit, reasons for misfits."""

from __future__ import annotations

import pytest

from stagewise.errors import PlanError
from stagewise.plan import Cluster, ParallelConfig, TrainingSpec, evaluate, get_gpu, get_model
from stagewise.plan.search import candidates, search

H100 = get_gpu("h100")


def test_candidates_respect_every_constraint() -> None:
    model = get_model("llama-2-70b")  # 64 heads, 8 key/value heads, 80 layers
    cluster = Cluster(H100, 4, 8)
    run = TrainingSpec(seq_len=4096, global_batch=64)
    configs = list(candidates(model, cluster, run))
    assert configs
    for cfg in configs:
        assert cfg.tp * cfg.pp * cfg.dp == 32
        assert cfg.tp <= 8
        assert 8 % cfg.tp == 0
        assert model.kv_heads % cfg.tp == 0
        assert 64 % (cfg.dp * cfg.micro_batch_size) == 0
        assert cfg.pp * cfg.num_chunks <= model.layers
        assert cfg.schedule not in ("gpipe", "auto")
        if cfg.tp == 1:
            assert not cfg.sequence_parallel
        if cfg.dp == 1:
            assert cfg.dp_sharding == "none"
        if cfg.schedule == "interleaved-1f1b":
            assert model.layers % (cfg.pp * cfg.num_chunks) == 0
    layouts = {(c.tp, c.pp) for c in configs}
    assert {(8, 1), (2, 4), (4, 2), (4, 4), (1, 32)} <= layouts
    assert all(c.recompute != "selective" for c in configs)  # flash: selective == none


def test_tp_that_does_not_divide_heads_is_never_proposed() -> None:
    model = get_model("gpt2-xl")  # 25 heads
    run = TrainingSpec(seq_len=1024, global_batch=8)
    configs = list(candidates(model, Cluster(H100, 1, 8), run))
    assert {c.tp for c in configs} == {1}


def test_search_ranks_fitting_plans_by_step_time_and_explains_the_rest() -> None:
    model = get_model("llama-2-13b")
    cluster = Cluster(H100, 1, 8)
    run = TrainingSpec(seq_len=4096, global_batch=16)
    seen: list[tuple[int, int]] = []
    result = search(model, cluster, run, {"micro_batch_size": 1, "sequence_parallel": True},
                    progress=lambda done, total: seen.append((done, total)))
    assert seen
    assert seen[-1][0] == seen[-1][1]
    fitting = result.fitting
    assert fitting
    assert not all(p.fits for p in result.plans)
    # Branch and bound timed only what could matter; check against timing every plan.
    k = 10
    times = [p.time.step_s for p in fitting]
    assert times[:k] == sorted(times)[:k]
    assert all(t >= times[k - 1] for t in times[k:])
    assert result.best is fitting[0]
    for plan in fitting:
        assert plan.time.step_s >= plan.lower_bound_s
    first_of_layout: dict[tuple[int, int], float] = {}
    fastest_of_layout: dict[tuple[int, int], float] = {}
    for plan in fitting:
        layout = (plan.config.tp, plan.config.pp)
        first_of_layout.setdefault(layout, plan.time.step_s)
        fastest_of_layout[layout] = min(plan.time.step_s, fastest_of_layout.get(layout, 1e9))
    assert first_of_layout == fastest_of_layout
    for plan in result.plans[len(fitting):]:
        assert plan.reason
        assert "GiB" in plan.reason
        assert "H100" in plan.reason
        assert plan.memory.total > H100.memory_gib * 2**30
    for plan in fitting:
        assert plan.memory.total <= H100.memory_gib * 2**30
        assert plan.reason is None
    # The best plan is re-evaluated identically on its own.
    alone = evaluate(model, cluster, run, result.best.config)
    assert alone.time.step_s == pytest.approx(result.best.time.step_s, rel=0.02)


def test_fixed_knobs_are_held() -> None:
    model = get_model("llama-2-7b")
    result = search(model, Cluster(H100, 1, 8), TrainingSpec(seq_len=2048, global_batch=32),
                    {"tp": 2, "pp": 2, "recompute": "full", "schedule": "1f1b"})
    assert result.plans
    for plan in result.plans:
        cfg = plan.config
        assert (cfg.tp, cfg.pp, cfg.dp, cfg.recompute, cfg.schedule) == (2, 2, 2, "full", "1f1b")


def test_uneven_layer_split_is_searched() -> None:
    model = get_model("llama-3-405b")  # 126 layers: pp = 4, 8, 16 split unevenly
    result = search(model, Cluster.of_gpus(H100, 512), TrainingSpec(seq_len=8192, global_batch=64),
                    {"tp": 8, "pp": 16, "schedule": "1f1b", "micro_batch_size": 1,
                     "recompute": "full", "sequence_parallel": True,
                     "dp_sharding": "optimizer"})
    (plan,) = result.plans
    assert sum(plan.layers) == 126
    assert max(plan.layers) - min(plan.layers) == 1
    assert plan.layers[0] == 7
    assert plan.layers[-1] == 7  # the outer stages get fewer


def test_nothing_valid_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="global batch"):
        search(get_model("llama-2-7b"), Cluster(H100, 1, 8),
               TrainingSpec(seq_len=2048, global_batch=3), {"dp": 2})


@pytest.mark.parametrize(("fixed", "named"), [
    ({"pp": 4, "num_chunks": 16}, r"pp x num_chunks = 4 x 16 = 64 exceeds .*32 layers.*at most 8"),
    ({"pp": 64}, r"PP=64 exceeds .*32 layers"),
    ({"tp": 2, "pp": 2, "dp": 4}, r"= 16 but the cluster has 8 GPUs"),
])
def test_nothing_valid_names_the_knob_that_rules_every_layout_out(
    fixed: dict[str, int], named: str
) -> None:
    with pytest.raises(PlanError, match=named):
        search(get_model("llama-2-7b"), Cluster(H100, 1, 8),
               TrainingSpec(seq_len=2048, global_batch=16), fixed)


def test_evaluate_rejects_bad_configurations_with_the_fix() -> None:
    model = get_model("llama-2-70b")
    cluster = Cluster(H100, 1, 8)
    run = TrainingSpec(seq_len=4096, global_batch=64)
    with pytest.raises(PlanError, match="not a multiple of dp x micro-batch size"):
        evaluate(model, cluster, run, ParallelConfig.of(tp=8, pp=1, dp=1, micro_batch_size=3))
    with pytest.raises(PlanError, match="key/value heads"):
        evaluate(get_model("gpt2-xl"), cluster, TrainingSpec(seq_len=1024, global_batch=8),
                 ParallelConfig.of(tp=2, pp=1, dp=4))
    with pytest.raises(PlanError, match="cluster has 8 GPUs"):
        evaluate(model, cluster, run, ParallelConfig.of(tp=8, pp=2, dp=1))
