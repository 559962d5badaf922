"""Checkpoints back out as Hugging Face folders (``runtime.checkpoint.export``, ``stagewise
export``).

A tiny model is saved by ``save_pretrained`` with a small tokenizer, loaded as stagewise layers
from its folder, changed, and saved as a checkpoint: in one process, and cut over two pipeline
ranks (GPT-2, whose tied embedding then lives on both). The export must load with
``AutoModelForCausalLM.from_pretrained`` and give the changed stagewise layers' logits, with
the tokenizer beside it; every bad input is one ConfigError (exit 2 from the CLI).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from stagewise.errors import ConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import Tensor  # noqa: E402

from stagewise.cli.main import cli  # noqa: E402
from stagewise.runtime.checkpoint.export import (  # noqa: E402
    export_checkpoint,
    model_files,
    save_model_files,
)
from stagewise.runtime.checkpoint.state import save_checkpoint  # noqa: E402
from stagewise.runtime.engine.launch import launch  # noqa: E402
from stagewise.runtime.models.hf_folder import folder_parts  # noqa: E402
from workers.export import SCALE, save_pipeline_checkpoint  # noqa: E402

LLAMA = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
    "max_position_embeddings": 64,
}
GPT2 = {"n_embd": 32, "n_layer": 3, "n_head": 4, "vocab_size": 64, "n_positions": 64,
        "bos_token_id": 0, "eos_token_id": 1}
WORDS = ["<unk>", "<eos>", *(f"w{i}" for i in range(62))]


def save_model(folder: Path, model_type: str, fields: dict[str, Any]) -> Path:
    """A tiny causal LM and a word-level tokenizer of its vocabulary, saved into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = transformers.AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    vocab = {word: i for i, word in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>"
    )
    fast.save_pretrained(folder)
    return folder


def logits(layers: Any, ids: Tensor) -> Tensor:
    out = ids
    with torch.no_grad():
        for layer in layers:
            out = layer.eval()(out)
    return out


def exported_logits(folder: Path, ids: Tensor) -> Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out: Tensor = model(ids).logits
    return out


IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Llama folder, its layers with one weight changed, and their checkpoint (step 5)."""
    root = tmp_path_factory.mktemp("export")
    folder = save_model(root / "llama", "llama", LLAMA)
    parts = folder_parts(folder, seq_len=8, empty=False)
    block: Any = parts.layers[1]
    with torch.no_grad():
        block.block.mlp.down_proj.weight.add_(0.5)
    params = list({id(p): p for layer in parts.layers for p in layer.parameters()}.values())
    checkpoints = root / "ckpt"
    save_checkpoint(checkpoints, 5, dict(enumerate(parts.layers)), torch.optim.AdamW(params))
    save_model_files(checkpoints / "step-00000005", folder)
    return {"root": root, "folder": folder, "layers": parts.layers, "checkpoints": checkpoints}


def test_export_loads_with_from_pretrained(llama: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = export_checkpoint(llama["checkpoints"], out, max_shard_size="20KB")
    assert done.step == 5
    assert done.checkpoint.name == "step-00000005"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # sharded
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(done.files)
    want = logits(llama["layers"], IDS)
    torch.testing.assert_close(exported_logits(out, IDS), want)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("w3 w7")["input_ids"] == [5, 9]


def test_save_model_files_copies_all_but_weights(llama: dict[str, Any]) -> None:
    files = model_files(llama["checkpoints"] / "step-00000005")
    assert files == llama["checkpoints"] / "model"
    names = {p.name for p in files.iterdir()}
    assert {"config.json", "tokenizer.json"} <= names
    assert not any(name.endswith(".safetensors") for name in names)


@pytest.mark.multiproc
@pytest.mark.slow
def test_pipeline_checkpoint_exports(tmp_path: Path) -> None:
    """GPT-2 (tied) cut over 2 ranks, each reading its own stage, scaled, saved; exported."""
    folder = save_model(tmp_path / "gpt2", "gpt2", GPT2)
    checkpoints = tmp_path / "ckpt"
    held = launch(save_pipeline_checkpoint, 2, (str(folder), str(checkpoints), 3), timeout=120)
    assert held == [3, 2]  # embedding + 2 blocks, 1 block + head
    save_model_files(checkpoints, folder)
    assert cli(["export", str(checkpoints), str(tmp_path / "out")]) == 0
    reference = folder_parts(folder, seq_len=8, empty=False)
    params = {id(p): p for layer in reference.layers for p in layer.parameters()}.values()
    with torch.no_grad():
        for param in params:
            param.mul_(SCALE)
    torch.testing.assert_close(exported_logits(tmp_path / "out", IDS),
                               logits(reference.layers, IDS))


def test_cli_json(llama: dict[str, Any], tmp_path: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert cli(["export", str(llama["checkpoints"]), str(out), "--json",
                "--dtype", "bfloat16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 5
    assert report["out"] == str(out)
    assert report["num_bytes"] == 2 * sum(p.numel() for layer in llama["layers"]
                                          for p in {id(q): q for q in layer.parameters()}.values())
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_out_dir_not_empty(llama: dict[str, Any], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["export", str(llama["checkpoints"]), str(out)]
    assert cli(args) == 2
    assert "is not empty (notes.txt)" in capsys.readouterr().err
    assert cli([*args, "--force"]) == 2  # not a model folder: never deleted
    assert "--force replaces only a Hugging Face model folder" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    shutil.rmtree(out)
    assert cli(args) == 0
    assert cli(args) == 2
    assert cli([*args, "--force"]) == 0  # a model folder is replaced
    torch.testing.assert_close(exported_logits(out, IDS), logits(llama["layers"], IDS))


def _bad(checkpoint: Path, out: Path, *fragments: str) -> None:
    with pytest.raises(ConfigError) as error:
        export_checkpoint(checkpoint, out)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_checkpoints(llama: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    _bad(tmp_path / "nope", out, "does not exist", "--checkpoint-dir")
    (tmp_path / "empty").mkdir()
    _bad(tmp_path / "empty", out, "no complete checkpoint", "it is empty")
    cut = tmp_path / "cut" / "step-00000002"
    cut.mkdir(parents=True)
    _bad(cut, out, "is not a complete checkpoint", "COMPLETE")
    bare = tmp_path / "bare"
    shutil.copytree(llama["checkpoints"] / "step-00000005", bare / "step-00000005")
    _bad(bare, out, "has no model files", "train with --model FOLDER")
    assert not out.exists()


def test_checkpoint_of_another_model(llama: dict[str, Any], tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(llama["checkpoints"] / "step-00000005", other / "step-00000005")
    save_model_files(other, save_model(tmp_path / "bigger", "llama",
                                       {**LLAMA, "intermediate_size": 96}))
    _bad(other, tmp_path / "out", "has shape")
