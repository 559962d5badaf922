"""Catalogs and Hugging Face configs: shapes and parameter counts against hand counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stagewise.errors import PlanError
from stagewise.plan import Cluster, catalog_gpus, catalog_models, get_gpu, get_model
from stagewise.plan.models import ModelSpec, model_from_hf_config


def test_llama_2_70b_has_grouped_query_attention_and_69b_parameters() -> None:
    model = get_model("llama-2-70b")
    assert (model.heads, model.kv_heads, model.head_dim, model.kv_dim) == (64, 8, 128, 1024)
    # Hand count: per block 2·h² (Q, O) + 2·h·1024 (K, V) + 3·h·f (SwiGLU) + 2·h (norms).
    h, f = 8192, 28672
    block = 2 * h * h + 2 * h * 1024 + 3 * h * f + 2 * h
    total = 80 * block + 2 * 32000 * h + h
    assert model.num_params == total
    assert 68.9e9 < total < 69.1e9


def test_gpt_blocks_have_twelve_h_squared_weights_plus_biases_and_layernorms() -> None:
    gpt = get_model("gpt-3-175b")
    h = 12288
    assert gpt.layer_matmul_params == 12 * h * h
    assert gpt.layer_params == 12 * h * h + 13 * h  # biases 9h + 4h layernorm
    assert 174e9 < gpt.num_params < 176e9


def test_padded_vocab_follows_megatron_rule() -> None:
    model = get_model("llama-3-8b")
    assert model.padded_vocab(1) == 128256
    assert model.padded_vocab(8) == 129024  # next multiple of 128 x 8


def test_every_catalog_entry_loads_with_a_source() -> None:
    for name in catalog_models():
        assert get_model(name).source
    for name in catalog_gpus():
        gpu = get_gpu(name)
        assert gpu.source
        assert gpu.peak_flops > 1e13
        assert gpu.memory_gib >= 32


def test_gpu_aliases_and_reference_figures() -> None:
    h100 = get_gpu("H100")
    assert h100.name == "H100-SXM5-80GB"
    assert h100.peak_flops == pytest.approx(989.4e12)
    assert h100.nvlink_bandwidth == pytest.approx(450e9)
    assert get_gpu("a100-40gb").memory_gib == 40
    assert get_gpu("h200").hbm_bandwidth == pytest.approx(4.8e12)


def test_unknown_names_list_the_catalog() -> None:
    with pytest.raises(PlanError, match="H100-SXM5-80GB"):
        get_gpu("h1000")
    with pytest.raises(PlanError, match="llama-2-70b"):
        get_model("llama-9")


def test_hf_llama_config_reads_gqa_swiglu_and_tied_embeddings(tmp_path: Path) -> None:
    config = {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 16,
        "vocab_size": 128256, "hidden_act": "silu", "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    model = model_from_hf_config(path)
    assert (model.kv_heads, model.mlp, model.tied_embeddings) == (8, "swiglu", True)
    assert model.num_params == get_model("llama-3.2-1b").num_params - 0  # same shape
    assert model.head_params() == 2048  # tied: only the final norm


def test_hf_gpt2_config_is_gelu_layernorm_learned_positions() -> None:
    model = model_from_hf_config(
        {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
         "vocab_size": 50257, "n_positions": 1024}
    )
    shape = (model.mlp, model.norm, model.position, model.ffn)
    assert shape == ("gelu", "layernorm", "learned", 3072)
    assert model.tied_embeddings
    assert model.bias
    assert model.num_params == 124_439_808  # GPT-2 small, the published count


def test_hf_bloom_config_is_alibi_with_biases_and_the_model_cards_parameters() -> None:
    # bigscience/bloom's config.json fields; its model card counts 176,247,271,424
    # parameters, which includes the embedding LayerNorm (2 h) the planner leaves out.
    bloom = model_from_hf_config({"model_type": "bloom", "n_layer": 70, "hidden_size": 14336,
                                  "n_head": 112, "vocab_size": 250880,
                                  "attention_dropout": 0.0, "hidden_dropout": 0.0})
    assert (bloom.position, bloom.mlp, bloom.norm, bloom.bias) == ("alibi", "gelu",
                                                                    "layernorm", True)
    assert bloom.tied_embeddings
    assert not bloom.dropout
    assert bloom.ffn == 4 * 14336
    assert bloom.num_params + 2 * 14336 == 176_247_271_424
    assert bloom.embedding_params() == 250880 * 14336  # ALiBi: no position table


def test_hf_bloom_configs_with_the_older_field_names_read_alike(tmp_path: Path) -> None:
    # bloom-560m's config.json names its width n_embed and its heads num_attention_heads
    old = model_from_hf_config({"model_type": "bloom", "n_embed": 1024, "n_layer": 24,
                                "num_attention_heads": 16, "vocab_size": 250880,
                                "seq_length": 2048})
    new = model_from_hf_config({"model_type": "bloom", "hidden_size": 1024, "n_layer": 24,
                                "n_head": 16, "vocab_size": 250880})
    assert old == new
    assert (old.layers, old.heads, old.hidden) == (24, 16, 1024)
    with pytest.raises(PlanError, match="not a number"):
        model_from_hf_config({"model_type": "bloom", "hidden_size": 1024, "n_layer": 24,
                              "n_head": "sixteen", "vocab_size": 8})
    listed = tmp_path / "config.json"
    listed.write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(PlanError, match="not a JSON object"):
        model_from_hf_config(listed)


def test_bad_configs_are_plan_errors(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="model_type"):
        model_from_hf_config({"model_type": "bert"})
    with pytest.raises(PlanError, match="cannot read"):
        model_from_hf_config(tmp_path / "missing.json")
    with pytest.raises(PlanError, match="kv_heads"):
        ModelSpec("bad", layers=2, hidden=64, heads=8, kv_heads=3, ffn=128, vocab=10)


def test_cluster_of_gpus_splits_into_nodes() -> None:
    gpu = get_gpu("h100")
    assert Cluster.of_gpus(gpu, 32).nodes == 4
    assert Cluster.of_gpus(gpu, 4).gpus_per_node == 4
    with pytest.raises(PlanError, match="multiple"):
        Cluster.of_gpus(gpu, 12)
