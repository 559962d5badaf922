"""The planner's LoRA activations against what one real Hugging Face block saves for backward.

A small Llama block gets ``stagewise train``'s LoRA (peft adapters in float32 on every
projection, the base frozen and cast to bf16) and runs one forward under bf16 autocast, as a
pipeline stage does; the runtime's own counter (``SavedBytes``: every storage autograd keeps,
parameters left out) gives the bytes, and ``layer_activation_bytes`` must equal them, for
fused (SDPA) and eager attention.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from stagewise.plan import ModelSpec, ParallelConfig, TrainingSpec, layer_activation_bytes  # noqa: E402
from stagewise.runtime.engine.saved import SavedBytes  # noqa: E402
from stagewise.runtime.models.lora import LoraSpec, apply_lora, cast_frozen  # noqa: E402

HIDDEN, FFN, HEADS, KV_HEADS, SEQ, BATCH, RANK = 256, 704, 4, 2, 128, 2, 8
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _measured(attention: str) -> int:
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=512,
        max_position_embeddings=SEQ,
    )
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().train()
    block = model.model.layers[0]
    apply_lora(block, LoraSpec.parse(f"r={RANK},targets={TARGETS}"), seed=0, index=0)
    cast_frozen(block, torch.bfloat16)
    # The block's input comes from the previous block, so it needs a gradient.
    hidden = torch.randn(BATCH, SEQ, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(SEQ)[None].expand(BATCH, SEQ)
    mask = None
    if attention == "eager":  # eager attention adds an explicit causal mask
        mask = torch.full((SEQ, SEQ), float("-inf")).triu(1)[None, None].to(torch.bfloat16)
    with SavedBytes(model.parameters()) as saved, torch.autocast("cpu", dtype=torch.bfloat16):
        cos_sin = model.model.rotary_emb(hidden, positions)  # each stagewise block makes its own
        block(hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=positions)
    return saved.nbytes


@pytest.mark.parametrize(("attention", "planner"), [("sdpa", "flash"), ("eager", "unfused")])
def test_lora_block_activations_equal_the_bytes_a_real_block_saves(
    attention: str, planner: str
) -> None:
    model = ModelSpec(name="probe", layers=2, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS,
                      ffn=FFN, vocab=512, max_seq_len=SEQ)
    run = TrainingSpec(seq_len=SEQ, global_batch=BATCH, mode="lora", lora_rank=RANK,
                       attention=planner)
    config = ParallelConfig.of(tp=1, pp=1, dp=1, micro_batch_size=BATCH)
    assert layer_activation_bytes(model, run, config) == pytest.approx(_measured(attention),
                                                                     rel=0.01)
