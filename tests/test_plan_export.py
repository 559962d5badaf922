"""Exporters: the Megatron-LM line parses with argparse rules, the torchtitan TOML with tomllib."""

from __future__ import annotations

import argparse
import shlex

import pytest

from stagewise.plan import Cluster, ParallelConfig, TrainingSpec, evaluate, get_gpu, get_model
from stagewise.plan.evaluate import Plan
from stagewise.plan.export import export_notes, megatron_args, megatron_command, torchtitan_toml

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _megatron_parser() -> argparse.ArgumentParser:
    """The subset of Megatron-LM's options the exporter may emit, with their types."""
    parser = argparse.ArgumentParser(prog="pretrain_gpt.py", exit_on_error=False)
    for name in ("tensor-model-parallel-size", "pipeline-model-parallel-size",
                 "num-layers-per-virtual-pipeline-stage", "decoder-first-pipeline-num-layers",
                 "decoder-last-pipeline-num-layers", "recompute-num-layers", "micro-batch-size",
                 "global-batch-size", "seq-length", "max-position-embeddings", "num-layers",
                 "hidden-size", "ffn-hidden-size", "num-attention-heads", "num-query-groups",
                 "vocab-size", "num-virtual-stages-per-pipeline-rank"):
        parser.add_argument(f"--{name}", type=int)
    for name in ("sequence-parallel", "use-distributed-optimizer", "recompute-activations",
                 "overlap-grad-reduce", "group-query-attention", "swiglu",
                 "untie-embeddings-and-output-weights", "disable-bias-linear", "use-flash-attn",
                 "bf16", "account-for-embedding-in-pipeline-split",
                 "account-for-loss-in-pipeline-split"):
        parser.add_argument(f"--{name}", action="store_true")
    parser.add_argument("--recompute-granularity", choices=("full", "selective"))
    parser.add_argument("--recompute-method", choices=("uniform", "block"))
    parser.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"))
    parser.add_argument("--position-embedding-type", choices=("learned_absolute", "rope"))
    parser.add_argument("--attention-dropout", type=float)
    parser.add_argument("--hidden-dropout", type=float)
    return parser


def _plan(**kw: object) -> Plan:
    base: dict[str, object] = {
        "tp": 4, "pp": 4, "dp": 2, "num_chunks": 5, "micro_batch_size": 1,
        "sequence_parallel": True, "dp_sharding": "optimizer",
        "schedule": "interleaved-1f1b", "recompute": "full",
    }
    base.update(kw)
    return evaluate(get_model("llama-2-70b"), Cluster(get_gpu("h100"), 4, 8),
                    TrainingSpec(seq_len=4096, global_batch=64), ParallelConfig.of(**base))  # type: ignore[arg-type]


def test_megatron_line_parses_and_round_trips_the_plan() -> None:
    plan = _plan()
    command = shlex.split(megatron_command(plan))
    assert command[:6] == ["torchrun", "--nnodes", "4", "--nproc-per-node", "8",
                           "pretrain_gpt.py"]
    ns = _megatron_parser().parse_args(command[6:])
    assert (ns.tensor_model_parallel_size, ns.pipeline_model_parallel_size) == (4, 4)
    assert ns.num_layers_per_virtual_pipeline_stage == 80 // (4 * 5)
    assert ns.sequence_parallel
    assert ns.use_distributed_optimizer
    assert ns.bf16
    assert (ns.recompute_granularity, ns.recompute_method, ns.recompute_num_layers) == (
        "full", "uniform", 1)
    assert (ns.micro_batch_size, ns.global_batch_size, ns.seq_length) == (1, 64, 4096)
    assert (ns.num_layers, ns.hidden_size, ns.ffn_hidden_size) == (80, 8192, 28672)
    assert ns.group_query_attention
    assert ns.num_query_groups == 8
    assert ns.swiglu
    assert ns.normalization == "RMSNorm"
    assert ns.position_embedding_type == "rope"
    assert ns.untie_embeddings_and_output_weights
    assert ns.disable_bias_linear
    assert ns.overlap_grad_reduce
    assert ns.use_flash_attn
    assert not export_notes(plan)[:1] or "torchtitan" in export_notes(plan)[0]


def test_megatron_selective_recompute_and_uneven_split() -> None:
    plan = evaluate(get_model("llama-3-405b"), Cluster.of_gpus(get_gpu("h100"), 128),
                    TrainingSpec(seq_len=8192, global_batch=16),
                    ParallelConfig.of(tp=8, pp=16, dp=1, recompute="selective"))
    ns = _megatron_parser().parse_args(megatron_args(plan))
    assert ns.recompute_activations
    assert ns.recompute_granularity is None
    assert (ns.decoder_first_pipeline_num_layers, ns.decoder_last_pipeline_num_layers) == (7, 7)
    assert ns.num_layers_per_virtual_pipeline_stage is None


def test_megatron_interleaved_edges_split_counts_the_embedding_and_loss_as_layers() -> None:
    # Llama 3 405B, 2 chunks: 126 layers over 32 virtual stages, 3 on the first and the last,
    # 4 elsewhere: Megatron's split with the embedding and the loss counted as layers,
    # (126 + 2) / 32 = 4 each.
    plan = evaluate(get_model("llama-3-405b"), Cluster.of_gpus(get_gpu("h100"), 256),
                    TrainingSpec(seq_len=8192, global_batch=32),
                    ParallelConfig.of(tp=8, pp=16, dp=2, num_chunks=2,
                                      schedule="interleaved-1f1b"))
    assert plan.layers == (3,) + (4,) * 30 + (3,)
    ns = _megatron_parser().parse_args(megatron_args(plan))
    assert ns.num_virtual_stages_per_pipeline_rank == 2
    assert ns.account_for_embedding_in_pipeline_split
    assert ns.account_for_loss_in_pipeline_split
    assert ns.num_layers_per_virtual_pipeline_stage is None
    assert ns.decoder_first_pipeline_num_layers is None
    assert not any("by hand" in note for note in export_notes(plan))
    # An interleaved split Megatron's flags cannot express is still left to the user.
    odd = evaluate(get_model("llama-3-405b"), Cluster.of_gpus(get_gpu("h100"), 192),
                   TrainingSpec(seq_len=8192, global_batch=24),
                   ParallelConfig.of(tp=8, pp=12, dp=2, num_chunks=2,
                                     schedule="interleaved-1f1b"))
    assert (126 + 2) % 24
    assert len(set(odd.layers)) > 1
    assert "--account-for-loss-in-pipeline-split" not in megatron_args(odd)
    assert any("by hand" in note for note in export_notes(odd))


def test_gpt_model_keeps_biases_dropout_and_tied_embeddings() -> None:
    plan = evaluate(get_model("gpt-22b"), Cluster(get_gpu("a100"), 1, 8),
                    TrainingSpec(seq_len=2048, global_batch=4, attention="unfused"),
                    ParallelConfig.of(tp=8, pp=1, dp=1, micro_batch_size=4))
    args = megatron_args(plan)
    ns = _megatron_parser().parse_args(args)
    assert not ns.disable_bias_linear
    assert not ns.untie_embeddings_and_output_weights
    assert ns.attention_dropout is None
    assert not ns.use_flash_attn
    assert not ns.swiglu
    assert ns.num_query_groups is None


def test_non_megatron_schedule_is_flagged() -> None:
    plan = _plan(schedule="zb-v", num_chunks=2)
    notes = export_notes(plan)
    assert any("zb-v" in note for note in notes)
    toml = tomllib.loads(torchtitan_toml(plan))
    assert toml["parallelism"]["pipeline_parallel_schedule"] == "ZBVZeroBubble"


def test_torchtitan_toml_parses_and_matches_the_plan() -> None:
    plan = _plan()
    text = torchtitan_toml(plan)
    config = tomllib.loads(text)
    par = config["parallelism"]
    assert (par["tensor_parallel_degree"], par["pipeline_parallel_degree"]) == (4, 4)
    assert par["data_parallel_shard_degree"] == 2
    assert par["data_parallel_replicate_degree"] == 1
    assert par["pipeline_parallel_schedule"] == "Interleaved1F1B"
    assert par["pipeline_parallel_layers_per_stage"] == 4
    # torchtitan counts the embedding and the output as layers unless told not to: 0 and 0
    # keep its stages at 80 / 4 = 20 = pp x v, the plan's even split.
    assert par["pipeline_parallel_first_stage_less_layers"] == 0
    assert par["pipeline_parallel_last_stage_less_layers"] == 0
    assert par["pipeline_parallel_microbatch_size"] == 1
    assert config["training"] == {"local_batch_size": 32, "global_batch_size": 64,
                                  "seq_len": 4096}
    assert config["activation_checkpoint"]["mode"] == "full"
    assert (config["model"]["name"], config["model"]["flavor"]) == ("llama2", "70B")
    plain = tomllib.loads(torchtitan_toml(_plan(dp_sharding="none")))
    assert plain["parallelism"]["data_parallel_replicate_degree"] == 2


def test_one_chunk_uneven_splits_export_only_what_megatron_can_express() -> None:
    """Megatron's first/last-stage flags leave the middle stages even; a split with unequal
    middle stages gets no such flags, and a note, instead of a line Megatron refuses."""
    cluster, training = Cluster.of_gpus(get_gpu("h100"), 64), TrainingSpec(seq_len=4096,
                                                                           global_batch=64)
    odd = evaluate(get_model("llama-2-70b"), cluster, training,
                   ParallelConfig.of(tp=8, pp=8, dp=1, layer_split="edges"))
    middle = odd.layers[1:-1]
    assert len(set(middle)) > 1  # 80 layers + 2 do not divide by 8
    ns = _megatron_parser().parse_args(megatron_args(odd))
    assert ns.decoder_first_pipeline_num_layers is None
    assert not ns.account_for_loss_in_pipeline_split
    assert any("by hand" in note for note in export_notes(odd))


def test_the_llama_3_layout_exports_one_slot_a_chunk_to_torchtitan_and_megatron() -> None:
    # 126 layers + embedding + loss over 16 x 8 chunks: torchtitan's ceil((126 + 1 + 1) / 1)
    # = 128 stages, 8 a rank; Megatron's virtual stages with the account-for flags.
    model = get_model("llama-3-405b")
    config = ParallelConfig.of(tp=8, pp=16, dp=64, num_chunks=8, micro_batch_size=1,
                               schedule="interleaved-1f1b", layer_split="edges",
                               sequence_parallel=True, dp_sharding="optimizer")
    plan = evaluate(model, Cluster.of_gpus(get_gpu("h100"), 8192),
                    TrainingSpec(seq_len=8192, global_batch=2048), config)
    par = tomllib.loads(torchtitan_toml(plan))["parallelism"]
    slots = (par["pipeline_parallel_first_stage_less_layers"] + 126
             + par["pipeline_parallel_last_stage_less_layers"])
    assert slots / par["pipeline_parallel_layers_per_stage"] == 16 * 8
    args = megatron_args(plan)
    assert args[args.index("--num-virtual-stages-per-pipeline-rank") + 1] == "8"
    assert not any("cannot express" in note for note in export_notes(plan))
