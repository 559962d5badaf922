"""The search tries the ``edges`` layer split (embedding and loss counted as a layer each)
where it moves a layer, and picks it exactly when it is faster."""

from __future__ import annotations

from dataclasses import replace

import pytest

from stagewise.errors import PlanError
from stagewise.plan import (
    Cluster,
    ModelSpec,
    ParallelConfig,
    TrainingSpec,
    evaluate,
    get_gpu,
    get_model,
)
from stagewise.plan.export import megatron_args
from stagewise.plan.search import candidates, search

H100 = get_gpu("h100")
RUN = TrainingSpec(seq_len=1024, global_batch=16)
# Everything but the layer split held: the search chooses between two plans.
HELD = {"tp": 1, "pp": 4, "micro_batch_size": 1, "recompute": "none", "schedule": "1f1b"}


def _model(vocab: int) -> ModelSpec:
    """8 blocks of width 1024 over 4 stages: 2 blocks a stage balanced, (1, 3, 3, 1) edges."""
    return ModelSpec(name=f"toy-{vocab}", layers=8, hidden=1024, heads=16, kv_heads=16,
                     ffn=4096, vocab=vocab, max_seq_len=1024)


def _head_over_block(model: ModelSpec) -> float:
    """Forward matmul FLOPs of the output head over those of one block, per token, by hand:
    the head is h x V; a block is 4 h^2 (q, k, v, o) + 3 h f (SwiGLU) plus 2 s h of
    attention scores and values (causal: half of 4 s h)."""
    h, f, s = model.hidden, model.ffn, RUN.seq_len
    block = 2 * (4 * h * h + 3 * h * f) + 2 * s * h
    return 2 * h * model.vocab / block


def _both(model: ModelSpec) -> dict[str, float]:
    """Step time of each split, each plan evaluated on its own (the reference)."""
    return {
        config.layer_split: evaluate(model, Cluster(H100, 1, 4), RUN, config).time.step_s
        for config in candidates(model, Cluster(H100, 1, 4), RUN, HELD)
    }


def test_edges_split_wins_when_the_head_outweighs_a_block() -> None:
    # The last stage runs its blocks and the head: balanced 2 blocks + head, edges
    # max(3 blocks, 1 block + head). A head heavier than a block makes edges faster.
    model = _model(vocab=256_000)
    assert _head_over_block(model) > 5
    result = search(model, Cluster(H100, 1, 4), RUN, HELD)
    assert sorted(p.config.layer_split for p in result.plans) == ["balanced", "edges"]
    best = result.best
    assert best is not None
    assert best.config.layer_split == "edges"
    assert best.layers == (1, 3, 3, 1)
    times = _both(model)
    assert times["edges"] < times["balanced"]
    assert best.time.step_s == times["edges"]
    assert "edges-split" in best.config.describe()


def test_balanced_split_wins_when_a_block_outweighs_the_head() -> None:
    # Edges puts 3 blocks on the middle stages; balanced 2 blocks + a light head at most.
    model = _model(vocab=8_000)
    assert _head_over_block(model) < 0.5
    result = search(model, Cluster(H100, 1, 4), RUN, HELD)
    best = result.best
    assert best is not None
    assert best.config.layer_split == "balanced"
    assert best.layers == (2, 2, 2, 2)
    times = _both(model)
    assert times["balanced"] < times["edges"]
    assert best.time.step_s == times["balanced"]


def test_edges_is_tried_only_where_it_moves_a_layer() -> None:
    cluster = Cluster(H100, 1, 8)
    run = TrainingSpec(seq_len=2048, global_batch=8)

    def splits(model: ModelSpec, **held: object) -> set[tuple[int, int, str]]:
        return {(c.pp, c.num_chunks, c.layer_split)
                for c in candidates(model, cluster, run, {"tp": 1, **held})}

    llama = get_model("llama-2-7b")  # 32 layers
    found = splits(llama, schedule="1f1b")
    # pp = 2: 34 slots split 17 + 17, less one each, is 16 + 16 again; pp = 4, 8 move a layer.
    assert found == {(1, 1, "balanced"), (2, 1, "balanced"), (4, 1, "balanced"),
                     (4, 1, "edges"), (8, 1, "balanced"), (8, 1, "edges")}
    # Virtual stages: edges only where the layers + 2 split evenly (32 + 2 over 4 x v never).
    assert {s for _, _, s in splits(llama, pp=4, schedule="interleaved-1f1b")} == {"balanced"}
    assert {s for _, _, s in splits(llama, pp=4, schedule="interleaved-1f1b",
                                    layer_split="edges")} == {"edges"}
    # 4 layers over 4 stages: edges would leave the first and last stage no layer.
    four = ModelSpec(name="four", layers=4, hidden=512, heads=8, kv_heads=8, ffn=2048,
                     vocab=1000)
    assert splits(four, pp=4, schedule="1f1b") == {(4, 1, "balanced")}
    # A fixed split is held, also where it is the same as the other.
    assert {s for _, _, s in splits(llama, layer_split="edges")} == {"edges"}
    assert {s for _, _, s in splits(llama, layer_split="balanced")} == {"balanced"}


def test_a_fixed_edges_split_that_empties_a_stage_is_skipped_with_the_fix() -> None:
    four = ModelSpec(name="four", layers=4, hidden=512, heads=8, kv_heads=8, ffn=2048,
                     vocab=1000)
    result = search(four, Cluster(H100, 1, 4), RUN, {**HELD, "layer_split": "edges"})
    assert result.plans == []
    ((config, reason),) = result.skipped
    assert config.endswith("edges-split")
    assert "no layer" in reason
    assert "layer_split='balanced'" in reason


def test_virtual_stages_try_the_edges_split_where_the_layers_plus_two_divide() -> None:
    # Llama 3 405B: 126 layers over pp = 16 split evenly into no v > 1, but 126 + 2 slots
    # do into 16 x 2, 16 x 4 and 16 x 8 (one slot a chunk: the first only the embedding).
    model = get_model("llama-3-405b")
    cluster = Cluster.of_gpus(H100, 8192)
    run = TrainingSpec(seq_len=8192, global_batch=2048)
    held = {"tp": 8, "pp": 16, "dp": 64, "micro_batch_size": 1, "recompute": "none",
            "schedule": "interleaved-1f1b", "sequence_parallel": True,
            "dp_sharding": "gradients"}
    found = {(c.num_chunks, c.layer_split) for c in candidates(model, cluster, run, held)}
    assert found == {(2, "edges"), (4, "edges"), (8, "edges")}
    plan = search(model, cluster, run, {**held, "num_chunks": 8}, exact_top=1).best
    assert plan is not None
    assert plan.layers == (0,) + (1,) * 126 + (0,)
    args = megatron_args(plan)
    assert "--account-for-embedding-in-pipeline-split" in args
    assert args[args.index("--num-virtual-stages-per-pipeline-rank") + 1] == "8"


def test_more_virtual_stages_than_layers_and_edges_is_refused_with_the_limit() -> None:
    model = get_model("llama-3-405b")
    config = ParallelConfig.of(tp=8, pp=16, dp=64, num_chunks=9, micro_batch_size=1,
                               schedule="interleaved-1f1b", layer_split="edges")
    with pytest.raises(PlanError, match=r"16 x 9 exceeds 126 layers \+ the embedding and the"):
        evaluate(model, Cluster.of_gpus(H100, 8192), TrainingSpec(seq_len=8192,
                 global_batch=2048), config)
    with pytest.raises(PlanError, match="exceeds 126 layers: lower pp"):
        evaluate(model, Cluster.of_gpus(H100, 8192), TrainingSpec(
            seq_len=8192, global_batch=2048), replace(config, num_chunks=8,
                                                      layer_split="balanced"))


def test_the_split_asked_for_decides_how_many_virtual_stages_the_search_tries() -> None:
    # 405B over pp = 16: layers + 2 = 128 divide 16 x 2, 4, 8, the layers alone none. Held
    # balanced, no v > 1 is even and none is tried; nothing held, v = 8 is valid (edges) and
    # the search does not call it too many.
    model = get_model("llama-3-405b")
    cluster = Cluster.of_gpus(H100, 8192)
    run = TrainingSpec(seq_len=8192, global_batch=2048)
    held = {"tp": 8, "pp": 16, "dp": 64, "micro_batch_size": 1, "recompute": "none",
            "schedule": "interleaved-1f1b", "sequence_parallel": True, "dp_sharding": "gradients"}
    assert list(candidates(model, cluster, run, {**held, "layer_split": "balanced"})) == []
    with pytest.raises(PlanError, match=r"at most 7$"):
        search(model, cluster, run, {**held, "layer_split": "balanced", "num_chunks": 8})
    assert search(model, cluster, run, {**held, "num_chunks": 8}, exact_top=1).best is not None


def test_an_uneven_edges_split_asked_for_is_searched_as_evaluate_takes_it() -> None:
    # 31 layers + 2 over 4 x 8 stages is uneven (one stage holds 2); evaluate takes it when
    # asked for, and so does the search; without the split held it names the fix.
    model = ModelSpec(name="m31", layers=31, hidden=1024, heads=16, kv_heads=16, ffn=4096,
                      vocab=1000)
    cluster = Cluster.of_gpus(H100, 4)
    run = TrainingSpec(seq_len=1024, global_batch=32)
    held = {"tp": 1, "pp": 4, "num_chunks": 8, "schedule": "interleaved-1f1b",
            "micro_batch_size": 1, "recompute": "none"}
    plan = search(model, cluster, run, {**held, "layer_split": "edges"}, exact_top=1).best
    assert plan is not None
    assert (plan.layers[0], plan.layers[-1], sum(plan.layers)) == (0, 0, 31)
    direct = evaluate(model, cluster, run, plan.config)
    assert direct.time.step_s == pytest.approx(plan.time.step_s)
    with pytest.raises(PlanError, match="or to 8 with layer_split='edges'"):
        search(model, cluster, run, held)
