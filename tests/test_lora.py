"""LoRA through peft (``lora_spec``, ``runtime.models.lora``, ``runtime.checkpoint.export_lora``).

A tiny Llama is saved by ``save_pretrained`` into a temporary folder (nothing downloaded) and
read as stagewise layers; :func:`apply_lora` adapts them layer by layer. The references are peft
itself: ``peft.get_peft_model`` on the whole ``from_pretrained`` model, given the same adapter
weights, must give the same logits and adapter gradients; an exported adapter folder must load
with ``PeftModel.from_pretrained`` and a ``--merge`` export with ``from_pretrained``, both giving
the stagewise layers' logits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from stagewise.errors import ConfigError
from stagewise.lora_spec import LoraSpec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from torch import Tensor, nn  # noqa: E402

from stagewise.cli.main import cli  # noqa: E402
from stagewise.runtime.checkpoint.export import save_model_files  # noqa: E402
from stagewise.runtime.checkpoint.export_lora import (  # noqa: E402
    export_lora,
    read_lora_spec,
    save_lora_spec,
)
from stagewise.runtime.checkpoint.state import load_checkpoint, save_checkpoint  # noqa: E402
from stagewise.runtime.models.hf_folder import folder_parts  # noqa: E402
from stagewise.runtime.models.hf_models import hf_layers, hf_parts  # noqa: E402
from stagewise.runtime.models.lora import (  # noqa: E402
    adapter_layers,
    apply_lora,
    check_lora_mesh,
    check_lora_targets,
    peft_config,
    trainable_parameters,
)

LLAMA = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
    "max_position_embeddings": 64, "tie_word_embeddings": False,
}
SPEC = LoraSpec(r=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
LLAMA_LINEARS = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved by save_pretrained."""
    path = tmp_path_factory.mktemp("lora") / "llama"
    config = transformers.AutoConfig.for_model("llama", **LLAMA)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def lora_layers(folder: Path, spec: LoraSpec = SPEC, seed: int = 0) -> list[nn.Module]:
    """The folder's layers as a rank builds them: filled one by one, then adapted."""
    parts = folder_parts(folder, seq_len=8)
    assert parts.materialize is not None
    for index, layer in enumerate(parts.layers):
        parts.materialize([layer])
        apply_lora(layer, spec, seed=seed, index=index)
    return list(parts.layers)


def randomize_b(layers: list[nn.Module]) -> None:
    """Give every lora_B values (its first value, zero, would hide the adapters)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in layers:
            for name, param in layer.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def run(layers: list[nn.Module], ids: Tensor) -> Tensor:
    out = ids
    for layer in layers:
        out = layer(out)
    return out


def test_parse_and_defaults() -> None:
    spec = LoraSpec.parse("r=16,alpha=32,dropout=0.05,targets=q_proj,k_proj,v_proj,o_proj")
    assert spec == LoraSpec(16, 32.0, 0.05, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert spec.scale == 2.0
    assert LoraSpec.parse("r=4") == LoraSpec(r=4, alpha=16.0, dropout=0.0,
                                             targets=("q_proj", "v_proj"))
    assert LoraSpec.parse(spec.to_text()) == spec
    assert LoraSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize(("text", "message"), [
    ("r=0", "r must be an integer >= 1"),
    ("r=two", "r='two' is not an integer"),
    ("alpha=-1", "alpha must be > 0"),
    ("dropout=1", "dropout must be in [0, 1)"),
    ("rank=4", "unknown key 'rank'"),
    ("r=4,r=8", "repeated key 'r'"),
    ("targets=q_proj,r=4", "put targets last"),
    ("q_proj", "'q_proj' is not key=value"),
    ("targets=", "at least one target"),
    ("targets=q_proj,q_proj", "name a module twice"),
    ("targets=self_attn.q_proj", "is not a module name"),
])
def test_bad_specs_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        LoraSpec.parse(text)


def test_targets_the_model_lacks_name_the_ones_it_has(folder: Path) -> None:
    parts = folder_parts(folder, seq_len=8)  # empty: checked before any weight is read
    assert check_lora_targets(parts, SPEC) == [*LLAMA_LINEARS.split(", "), "lm_head"]
    with pytest.raises(ConfigError, match="--lora targets qkv, fc1: the model") as info:
        check_lora_targets(parts, LoraSpec(targets=("q_proj", "qkv", "fc1")))
    assert f"it has {LLAMA_LINEARS}, lm_head" in str(info.value)
    gpt2 = hf_parts("gpt2", empty=True)  # lm_head is tied to the embedding: not a target
    assert check_lora_targets(gpt2, LoraSpec(targets=("c_attn",))) == ["c_attn", "c_proj", "c_fc"]


def test_tensor_parallel_is_refused() -> None:
    check_lora_mesh(1)
    with pytest.raises(ConfigError, match=r"--lora with tp=2 is not supported.*use --tp 1"):
        check_lora_mesh(2)


def test_only_adapters_train(folder: Path) -> None:
    layers = lora_layers(folder)
    trainable = trainable_parameters(layers)
    names = [n for layer in layers for n, p in layer.named_parameters() if p.requires_grad]
    assert len(trainable) == len(names) == 2 * 5 * LLAMA["num_hidden_layers"]
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    assert all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in trainable}
    run(layers, IDS).sum().backward()
    frozen = [p for layer in layers for p in layer.parameters() if not p.requires_grad]
    assert frozen
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in trainable)


def test_first_values_are_layout_free_and_keep_the_base_output(folder: Path) -> None:
    layers = lora_layers(folder, seed=5)
    again = folder_parts(folder, seq_len=8)
    assert again.materialize is not None
    last = again.layers[2]  # filled and adapted on its own, as another rank would
    again.materialize([last])
    assert apply_lora(last, SPEC, seed=5, index=2) == 5
    for (name, mine), theirs in zip(layers[2].state_dict().items(),
                                    last.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)
    a1 = layers[1].get_parameter("block.self_attn.q_proj.lora_A.default.weight")
    a2 = layers[2].get_parameter("block.self_attn.q_proj.lora_A.default.weight")
    assert not torch.equal(a1, a2)  # seeded by the name in the model, not inside the layer
    base = folder_parts(folder, seq_len=8, empty=False)
    with torch.no_grad():
        torch.testing.assert_close(run(layers, IDS), run(list(base.layers), IDS))


def test_matches_peft_on_the_whole_model(folder: Path) -> None:
    layers = lora_layers(folder)
    randomize_b(layers)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    reference = peft.get_peft_model(model, peft_config(SPEC, model))
    theirs, _ = hf_layers(reference.base_model.model)  # for the names only
    with torch.no_grad():
        for mine, other in zip(layers, theirs, strict=True):
            wanted = dict(mine.named_parameters())
            for name, param in other.named_parameters():
                if "lora_" in name:
                    param.copy_(wanted[name])
    ids, targets = IDS[:, :-1], IDS[:, 1:]
    out = run(layers, ids)
    want = reference(ids).logits
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    loss = nn.functional.cross_entropy(out.flatten(0, 1), targets.flatten())
    nn.functional.cross_entropy(want.flatten(0, 1), targets.flatten()).backward()
    loss.backward()
    for mine, other in zip(layers, theirs, strict=True):
        grads = {n: p.grad for n, p in other.named_parameters() if p.requires_grad}
        for name, param in mine.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6,
                                           msg=name)


def trained(folder: Path, root: Path) -> dict[str, Any]:
    """Adapted layers after one AdamW step, saved adapter-only as step 1 of ``root``."""
    layers = lora_layers(folder)
    randomize_b(layers)
    optimizer = torch.optim.AdamW(trainable_parameters(layers), lr=1e-2)
    run(layers, IDS).square().mean().backward()
    optimizer.step()
    checkpoints = root / "ckpt"
    save_checkpoint(checkpoints, 1, adapter_layers(dict(enumerate(layers))), optimizer)
    save_model_files(checkpoints, folder)
    save_lora_spec(checkpoints, SPEC, folder)
    return {"layers": layers, "optimizer": optimizer, "checkpoints": checkpoints}


@pytest.fixture(scope="module")
def lora_run(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return trained(folder, tmp_path_factory.mktemp("lora-run"))


def test_adapter_checkpoint_round_trip(folder: Path, lora_run: dict[str, Any]) -> None:
    step = lora_run["checkpoints"] / "step-00000001"
    meta = torch.distributed.checkpoint.FileSystemReader(str(step)).read_metadata()
    saved = [key for key in meta.state_dict_metadata if key.startswith("model.")]
    assert saved
    assert all(".lora_A." in key or ".lora_B." in key for key in saved)
    layers = lora_layers(folder, seed=9)  # other first values: all must come from the file
    optimizer = torch.optim.AdamW(trainable_parameters(layers), lr=1e-2)
    assert load_checkpoint(step, adapter_layers(dict(enumerate(layers))), optimizer)["step"] == 1
    for mine, saved_layer in zip(layers, lora_run["layers"], strict=True):
        torch.testing.assert_close(mine.state_dict(), saved_layer.state_dict(), rtol=0, atol=0)
    want = lora_run["optimizer"].state_dict()["state"]
    got = optimizer.state_dict()["state"]
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    record = read_lora_spec(step)
    assert record is not None
    assert record.spec == SPEC
    assert record.base_model == folder.resolve()


def test_export_adapter_loads_with_peft(folder: Path, lora_run: dict[str, Any],
                                        tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    done = export_lora(lora_run["checkpoints"], out)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(done.files)
    assert done.num_tensors == 2 * 5 * LLAMA["num_hidden_layers"]
    from safetensors.torch import load_file

    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        plain = base(IDS).logits
        model = peft.PeftModel.from_pretrained(base, out).eval()
        want = run([layer.eval() for layer in lora_run["layers"]], IDS)
        torch.testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-5)
    assert (want - plain).abs().max() > 1e-2  # the adapters change the output


def test_merge_export_loads_with_from_pretrained(folder: Path, lora_run: dict[str, Any],
                                                 tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert cli(["export", str(lora_run["checkpoints"]), str(out), "--merge"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want = run([layer.eval() for layer in lora_run["layers"]], IDS)
        torch.testing.assert_close(model(IDS).logits, want, rtol=1e-4, atol=1e-4)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_cli_exports_a_lora_checkpoint_as_an_adapter(lora_run: dict[str, Any],
                                                     tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    assert cli(["export", str(lora_run["checkpoints"]), str(out)]) == 0
    assert (out / "adapter_config.json").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == SPEC.r
    assert set(config["target_modules"]) == set(SPEC.targets)
    assert cli(["export", str(lora_run["checkpoints"]), str(out)]) == 2  # not empty
    assert cli(["export", str(lora_run["checkpoints"]), str(out), "--force"]) == 0


def test_bad_exports_are_refused(folder: Path, lora_run: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--merge needs the base model.*pass --base"):
        export_lora(lora_run["checkpoints"], tmp_path / "a", merge=True,
                    base_model=tmp_path / "gone")
    plain = tmp_path / "plain"
    parts = folder_parts(folder, seq_len=8, empty=False)
    params = [p for layer in parts.layers for p in layer.parameters()]
    save_checkpoint(plain, 1, dict(enumerate(parts.layers)), torch.optim.AdamW(params))
    save_model_files(plain, folder)
    with pytest.raises(ConfigError, match="is not a LoRA run's"):
        export_lora(plain, tmp_path / "b")
    assert cli(["export", str(plain), str(tmp_path / "c"), "--merge"]) == 2


def test_adapters_stay_float32_on_a_bf16_base(folder: Path) -> None:
    parts = folder_parts(folder, seq_len=8)
    assert parts.materialize is not None
    layer = parts.layers[1]
    parts.materialize([layer])
    layer.to(torch.bfloat16)  # the base cast first, then the adapters added
    assert apply_lora(layer, SPEC, seed=0, index=1) == 5
    dtypes = {n: p.dtype for n, p in layer.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    hidden = torch.randn(2, 8, LLAMA["hidden_size"], dtype=torch.bfloat16)
    out = layer(hidden)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None for p in trainable_parameters([layer]))


def test_gpt2_conv1d_adapters_export(tmp_path: Path) -> None:
    """GPT-2's Linears are transformers' Conv1D (tied head too): adapted, saved, exported."""
    config = transformers.AutoConfig.for_model(
        "gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    spec = LoraSpec(r=2, targets=("c_attn", "c_fc"))
    layers = lora_layers(tmp_path / "gpt2", spec)
    randomize_b(layers)
    optimizer = torch.optim.AdamW(trainable_parameters(layers))
    save_checkpoint(tmp_path / "ckpt", 3, adapter_layers(dict(enumerate(layers))), optimizer)
    save_model_files(tmp_path / "ckpt", tmp_path / "gpt2")
    save_lora_spec(tmp_path / "ckpt", spec, tmp_path / "gpt2")
    export_lora(tmp_path / "ckpt", tmp_path / "adapter")
    export_lora(tmp_path / "ckpt", tmp_path / "merged", merge=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        want = run([layer.eval() for layer in layers], IDS)
        torch.testing.assert_close(adapted(IDS).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(IDS).logits, want, rtol=1e-4, atol=1e-4)
