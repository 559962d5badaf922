"""Hugging Face families beyond Llama and GPT-2, and heads whose width is not hidden / heads.

Every count here is worked by hand from the config's numbers (or is the count the model's
authors publish), never read back from the planner.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stagewise.cli.main import cli
from stagewise.errors import PlanError
from stagewise.plan import (
    DEFAULT_CONSTANTS,
    ParallelConfig,
    TrainingSpec,
    get_gpu,
    hf_family_and_config,
)
from stagewise.plan.export import export_notes, megatron_args
from stagewise.plan.flops import model_flops_per_token
from stagewise.plan.layer import LayerSetup, block_time
from stagewise.plan.memory import layer_activation_bytes
from stagewise.plan.models import ModelSpec, model_from_hf_config

# mistralai/Mistral-Nemo-Base-2407's config.json (the fields the planner reads)
NEMO = {
    "model_type": "mistral", "hidden_size": 5120, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
    "num_hidden_layers": 40, "vocab_size": 131072, "hidden_act": "silu",
    "tie_word_embeddings": False, "max_position_embeddings": 1024000,
}


def test_heads_narrower_than_hidden_over_heads_count_their_own_projections() -> None:
    nemo = model_from_hf_config(NEMO)
    assert (nemo.head_dim, nemo.q_dim, nemo.kv_dim) == (128, 4096, 1024)
    # Q and O are 5120 x 4096, K and V 5120 x 1024, SwiGLU 3 x 5120 x 14336, two RMSNorms
    block = 2 * 5120 * 4096 + 2 * 5120 * 1024 + 3 * 5120 * 14336 + 2 * 5120
    assert nemo.num_params == 40 * block + 2 * 131072 * 5120 + 5120
    assert round(nemo.num_params / 1e9, 1) == 12.2  # the model card's "12B" (12.2B weights)


def test_gemma_defaults_to_256_wide_heads_and_tied_embeddings() -> None:
    gemma = model_from_hf_config({
        "model_type": "gemma", "hidden_size": 3072, "num_attention_heads": 16,
        "num_key_value_heads": 16, "intermediate_size": 24576, "num_hidden_layers": 28,
        "vocab_size": 256000, "hidden_act": "gelu_pytorch_tanh",
    })
    assert (gemma.head_dim, gemma.mlp, gemma.tied_embeddings) == (256, "swiglu", True)
    block = 4 * 3072 * 4096 + 3 * 3072 * 24576 + 2 * 3072  # gated GELU: three matrices
    assert gemma.num_params == 28 * block + 256000 * 3072 + 3072
    assert round(gemma.num_params / 1e9, 2) == 8.54  # Gemma 7B's published 8.54B


def test_a_llama_config_with_a_gelu_is_still_three_matrices() -> None:
    # LlamaMLP always has gate, up and down, whatever hidden_act says
    model = model_from_hf_config({
        "model_type": "llama", "hidden_size": 256, "num_attention_heads": 4,
        "intermediate_size": 512, "num_hidden_layers": 2, "vocab_size": 100,
        "hidden_act": "gelu",
    })
    assert model.mlp_matrices == 3


def test_qwen3_small_model_has_heads_wider_than_its_width() -> None:
    qwen = model_from_hf_config({
        "model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
        "num_hidden_layers": 28, "vocab_size": 151936, "tie_word_embeddings": True,
    })
    assert qwen.q_dim == 2048
    block = 2 * 1024 * 2048 + 2 * 1024 * 1024 + 3 * 1024 * 3072 + 2 * 1024
    assert qwen.num_params == 28 * block + 151936 * 1024 + 1024
    # Qwen3-0.6B: 0.44B without embeddings (its model card); the per-head q/k norms are left out
    assert round((qwen.num_params - 151936 * 1024) / 1e9, 2) == 0.44


def test_pythia_is_a_gpt_neox_block_with_the_papers_count() -> None:
    pythia = model_from_hf_config({
        "model_type": "gpt_neox", "hidden_size": 768, "num_attention_heads": 12,
        "intermediate_size": 3072, "num_hidden_layers": 12, "vocab_size": 50304,
        "max_position_embeddings": 2048, "rotary_pct": 0.25, "tie_word_embeddings": False,
    })
    shape = (pythia.mlp, pythia.norm, pythia.position, pythia.bias, pythia.tied_embeddings)
    assert shape == ("gelu", "layernorm", "rope", True, False)
    assert "25%" in pythia.source
    # Biderman et al. 2023, Table 1: Pythia-160M has 85,056,000 non-embedding parameters
    assert pythia.num_params - 2 * 50304 * 768 == 85_056_000


@pytest.mark.parametrize(("config", "expected"), [
    ({"model_type": "mpt", "d_model": 4096, "n_heads": 32, "n_layers": 32,
      "expansion_ratio": 4, "vocab_size": 50432, "attn_config": {"alibi": True}},
     ("alibi", False, 16384, True)),
    ({"model_type": "opt", "hidden_size": 768, "ffn_dim": 3072, "num_attention_heads": 12,
      "num_hidden_layers": 12, "vocab_size": 50272, "max_position_embeddings": 2048},
     ("learned", True, 3072, True)),
    ({"model_type": "starcoder2", "hidden_size": 3072, "intermediate_size": 12288,
      "num_attention_heads": 24, "num_key_value_heads": 2, "num_hidden_layers": 30,
      "vocab_size": 49152}, ("rope", True, 12288, True)),
    ({"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
      "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28,
      "vocab_size": 152064, "tie_word_embeddings": False}, ("rope", False, 18944, False)),
])
def test_each_family_reads_its_own_field_names(
    config: dict[str, object], expected: tuple[object, ...],
) -> None:
    model = model_from_hf_config(config)
    assert (model.position, model.bias, model.ffn, model.tied_embeddings) == expected
    assert str(config["model_type"]) in model.source


def test_mixture_of_experts_and_unknown_types_are_refused_by_name() -> None:
    with pytest.raises(PlanError, match="mixture of experts"):
        model_from_hf_config({"model_type": "mixtral", "hidden_size": 4096,
                              "num_local_experts": 8})
    with pytest.raises(PlanError, match=r"qwen3.*describe other"):
        model_from_hf_config({"model_type": "t5"})
    with pytest.raises(PlanError, match="head_dim"):  # 1000 / 16 is not whole, no head_dim
        model_from_hf_config({"model_type": "llama", "hidden_size": 1000,
                              "num_attention_heads": 16, "intermediate_size": 64,
                              "num_hidden_layers": 1, "vocab_size": 10})


def test_step_flops_count_the_query_width_not_the_model_width() -> None:
    nemo, s = model_from_hf_config(NEMO), 4096
    matmul = 2 * 5120 * 4096 + 2 * 5120 * 1024 + 3 * 5120 * 14336
    forward = 40 * (2 * matmul + 4 * s * 4096) + 2 * 5120 * 131072
    assert model_flops_per_token(nemo, s) == pytest.approx(3 * forward, rel=1e-12)


def test_attention_time_follows_the_heads_not_the_width() -> None:
    # Same 32 heads of 128 at width 5120 and at width 4096: the attention core is the same
    # work, the projections around it are not.
    nemo = model_from_hf_config(NEMO)
    square = ModelSpec("square", layers=40, hidden=4096, heads=32, kv_heads=8, ffn=14336,
                       vocab=131072)
    setup = LayerSetup(micro_batch_size=1, seq_len=8192, tp=1)
    gpu = get_gpu("H100")
    wide, narrow = block_time(nemo, gpu, setup), block_time(square, gpu, setup)
    assert wide.forward_attention == pytest.approx(narrow.forward_attention, rel=1e-12)
    assert wide.backward_attention == pytest.approx(narrow.backward_attention, rel=1e-12)
    assert wide.forward_gemm > narrow.forward_gemm


def test_saved_activations_count_query_and_attention_output_at_their_width() -> None:
    model = ModelSpec("wide-heads", layers=2, hidden=1024, heads=16, kv_heads=8, ffn=4096,
                      vocab=1000, kv_channels=128)
    run = TrainingSpec(seq_len=512, global_batch=2)
    config = ParallelConfig.of(tp=1, pp=1, dp=1, micro_batch_size=2)
    sb = 512 * 2
    h, q, kv, f, a = 1024, 16 * 128, 8 * 128, 4096, 16
    # Megatron's flash block in bf16 without dropout: norms and residual inputs 8 sbh; Q and
    # the attention output at q wide; K and V; SwiGLU's 6 sbf; the fp32 log-sum-exp per head
    expected = 8 * sb * h + 2 * sb * q + 4 * sb * kv + 2 * sb * q + 6 * sb * f + 4 * a * sb
    assert layer_activation_bytes(model, run, config, recompute="none") == expected


def test_head_width_reaches_megatron_and_round_trips_through_the_llama_family(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    nemo = model_from_hf_config(NEMO)
    family, fields = hf_family_and_config(nemo)
    assert (family, fields["head_dim"]) == ("llama", 128)
    rebuilt = model_from_hf_config({"model_type": family, **fields}, name=nemo.name)
    assert (rebuilt.q_dim, rebuilt.num_params) == (nemo.q_dim, nemo.num_params)

    path = tmp_path / "config.json"
    path.write_text(json.dumps(NEMO))
    common = ["--gpu", "H100", "--gpus", "8", "--seq-len", "4096", "--global-batch", "64",
              "--tp", "8", "--pp", "1", "--json"]
    assert cli(["plan", "--model-config", str(path), *common]) == 0
    from_config = json.loads(capsys.readouterr().out)
    flags = ["--layers", "40", "--hidden", "5120", "--heads", "32", "--kv-heads", "8",
             "--head-dim", "128", "--ffn", "14336", "--vocab", "131072"]
    assert cli(["plan", *flags, *common]) == 0
    from_flags = json.loads(capsys.readouterr().out)
    assert from_flags["plans"][0]["step_time_s"] == from_config["plans"][0]["step_time_s"]
    assert cli(["plan", "--model-config", str(path), "--heads", "8", *common]) == 2
    assert "--heads describes a model from flags" in capsys.readouterr().err


def test_megatron_line_carries_kv_channels_only_when_heads_are_not_hidden_over_heads() -> None:
    from stagewise.plan import Cluster, search

    cluster = Cluster.of_gpus(get_gpu("H100"), 8)
    run = TrainingSpec(seq_len=4096, global_batch=64)
    nemo = search(model_from_hf_config(NEMO), cluster, run, {"tp": 8, "pp": 1}).best
    assert nemo is not None
    args = megatron_args(nemo)
    assert args[args.index("--kv-channels") + 1] == "128"
    assert any("--kv-channels" in note for note in export_notes(nemo))
    square = ModelSpec("square", layers=4, hidden=4096, heads=32, kv_heads=8, ffn=14336,
                       vocab=131072)
    plain = search(square, cluster, run, {"tp": 8, "pp": 1}).best
    assert plain is not None
    assert "--kv-channels" not in megatron_args(plain)


def test_flash_attention_costs_the_kernels_head_width() -> None:
    # FlashAttention-2 runs an 80-wide head in its 96-wide kernel: 32 heads of 80 cost what 32
    # heads of 96 do, and 96 / 80 of what the 80-wide FLOPs would at the same rate
    def attention(head_dim: int) -> float:
        model = ModelSpec(f"d{head_dim}", layers=2, hidden=32 * head_dim, heads=32,
                          kv_heads=32, ffn=4096, vocab=1000)
        setup = LayerSetup(micro_batch_size=1, seq_len=4096, tp=1)
        return block_time(model, get_gpu("A100"), setup).forward_attention

    launch = DEFAULT_CONSTANTS.kernel_overhead_s  # the one launch outside the FLOPs
    assert attention(80) == pytest.approx(attention(96), rel=1e-12)
    assert (attention(64) - launch) * 96 / 64 == pytest.approx(attention(96) - launch, rel=1e-9)
