"""A local Hugging Face model folder as pipeline layers (``runtime.models.hf_folder``).

Tiny models are built and saved here with ``save_pretrained`` (nothing is downloaded). Run
layer by layer after a lazy load, each must give ``AutoModelForCausalLM.from_pretrained``'s
logits; a rank reads only its own layers' tensors, each shard opened once, and its memory grows
by its own layers plus about one tensor (measured); every bad folder is one ConfigError that
names the problem and the fix.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from stagewise.errors import ConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import Tensor  # noqa: E402

from stagewise.runtime.models.folder_weights import tensor_bytes  # noqa: E402
from stagewise.runtime.models.hf_folder import (  # noqa: E402
    check_model_folder,
    folder_parts,
    is_model_folder,
)

LLAMA = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
    "max_position_embeddings": 64,
}
GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 64, "n_positions": 64,
        "bos_token_id": 0, "eos_token_id": 1}
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", LLAMA),
    "gpt2-tied": ("gpt2", GPT2),
    "qwen2-tied": ("qwen2", {**LLAMA, "tie_word_embeddings": True}),
    "mistral": ("mistral", {**LLAMA, "sliding_window": 16}),
    # per-head q/k norms, and heads 16 wide where hidden / heads is 8
    "qwen3": ("qwen3", {**LLAMA, "head_dim": 16, "tie_word_embeddings": False}),
}


def save_model(folder: Path, model_type: str, fields: dict[str, Any], shard: str | None = None,
               seed: int = 0) -> Path:
    """A tiny causal LM with random weights saved by ``save_pretrained`` into ``folder``."""
    config = transformers.AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, max_shard_size=shard or "50GB")
    return folder


def layer_logits(layers: Any, ids: Tensor) -> Tensor:
    out = ids
    with torch.no_grad():
        for layer in layers:
            out = layer.eval()(out)
    return out


def reference_logits(folder: Path, ids: Tensor) -> Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits: Tensor = model(ids).logits
    return logits


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    made = {name: save_model(root / name, kind, fields) for name, (kind, fields) in MODELS.items()}
    made["llama-sharded"] = save_model(root / "llama-sharded", "llama", LLAMA, shard="20KB")
    return made


@pytest.mark.parametrize("name", [*MODELS, "llama-sharded"])
def test_layers_give_from_pretrained_logits(folders: dict[str, Path], name: str) -> None:
    parts = folder_parts(folders[name], seq_len=16)
    assert all(p.device.type == "meta" for p in parts.layers[1].parameters())
    for layer in parts.layers:  # one layer at a time, as a rank fills its stages
        assert parts.materialize is not None
        parts.materialize([layer])
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    want = reference_logits(folders[name], ids)
    torch.testing.assert_close(layer_logits(parts.layers, ids), want)


def test_sharded_folder_has_several_files(folders: dict[str, Path]) -> None:
    info = check_model_folder(folders["llama-sharded"])
    assert len(info.weight_files) > 2
    assert info.layout == "llama"
    assert info.shapes["model.embed_tokens.weight"] == (64, 32)
    assert not info.has_tokenizer


def test_tied_head_alone_reads_the_embedding(folders: dict[str, Path]) -> None:
    """A last stage holding only the head gets the file's input embedding as lm_head."""
    parts = folder_parts(folders["gpt2-tied"], seq_len=8)
    assert parts.ties == ({0: "wte.weight", 3: "lm_head.weight"},)
    assert parts.materialize is not None
    parts.materialize([parts.layers[-1]])
    from safetensors import safe_open

    with safe_open(str(folders["gpt2-tied"] / "model.safetensors"), framework="pt") as file:
        embedding = file.get_tensor("transformer.wte.weight")
    head: Any = parts.layers[-1]
    torch.testing.assert_close(head.lm_head.weight.detach(), embedding)


def test_gpt2_without_transformer_prefix(folders: dict[str, Path], tmp_path: Path) -> None:
    """GPT-2 checkpoints written without the ``transformer.`` prefix load the same."""
    from safetensors.torch import load_file, save_file

    source = folders["gpt2-tied"]
    shutil.copy(source / "config.json", tmp_path / "config.json")
    tensors = load_file(source / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    parts = folder_parts(tmp_path, seq_len=8, empty=False)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(layer_logits(parts.layers, ids), reference_logits(source, ids))


class _Reads:
    """Wraps ``safetensors.safe_open``: counts files opened and tensors read, and samples the
    process's resident memory after each tensor is read (and touched, so it is really in)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import safetensors

        self.opened: Counter[str] = Counter()
        self.read: list[str] = []
        self.peak = 0
        original = safetensors.safe_open
        reads = self

        class Handle:
            def __init__(self, file: str, framework: str) -> None:
                reads.opened[Path(file).name] += 1
                self.inner: Any = original(file, framework=framework)

            def __enter__(self) -> Handle:
                self.inner.__enter__()
                return self

            def __exit__(self, *exc: object) -> None:
                self.inner.__exit__(*exc)

            def get_tensor(self, name: str) -> Tensor:
                tensor: Tensor = self.inner.get_tensor(name)
                tensor.sum()  # touch every byte: a mapped file counts once it is read
                reads.read.append(name)
                reads.peak = max(reads.peak, resident_bytes())
                return tensor

        monkeypatch.setattr(safetensors, "safe_open", Handle)


def resident_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1)) * 1024


def test_reads_only_the_layers_asked_for(folders: dict[str, Path],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    parts = folder_parts(folders["llama-sharded"], seq_len=8)
    reads = _Reads(monkeypatch)
    assert parts.materialize is not None
    parts.materialize([parts.layers[2], parts.layers[3]])  # decoder blocks 1 and 2
    blocks: list[Any] = [parts.layers[2].block, parts.layers[3].block]
    want = {f"model.layers.{i + 1}.{name}" for i, block in enumerate(blocks)
            for name, _ in block.named_parameters()}
    assert sorted(reads.read) == sorted(want)
    assert max(reads.opened.values()) == 1  # each shard once per call
    assert all(p.device.type == "meta" for p in parts.layers[1].parameters())


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_memory_while_loading_is_own_layers_plus_one_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model of ~42 MB (8 blocks of 4.2 MB, embedding and head 4.2 MB each): loading blocks
    1 and 2 (8.4 MB) grows the process by those plus at most about one tensor."""
    big = {**LLAMA, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 8,
           "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 4096}
    folder = save_model(tmp_path / "big", "llama", big, shard="10MB")
    parts = folder_parts(folder, seq_len=8)
    mine = [parts.layers[2], parts.layers[3]]
    own, whole = tensor_bytes(mine), tensor_bytes(parts.layers)
    largest = max(p.numel() * p.element_size() for m in mine for p in m.parameters())
    reads = _Reads(monkeypatch)
    before = resident_bytes()
    assert parts.materialize is not None
    parts.materialize(mine)
    grown = reads.peak - before
    slack = 2 * 2**20  # allocator and page-table overhead
    assert grown <= own + largest + slack, (grown, own, largest)
    assert grown < whole / 3


def test_is_model_folder() -> None:
    assert is_model_folder("./llama")
    assert is_model_folder("org/model")
    assert not is_model_folder("tiny")
    assert not any(is_model_folder(s) for s in ("hf:llama", "py:pkg.mod:make"))


def _bad(path: Path | str, *fragments: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_model_folder(path)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_model_id_says_how_to_fetch() -> None:
    _bad("meta-llama/Llama-3.2-1B", "not a local folder", "downloads nothing",
         "hf download meta-llama/Llama-3.2-1B --local-dir DIR")


def test_missing_folder_and_a_file(tmp_path: Path) -> None:
    _bad(tmp_path / "nope", "does not exist")
    (tmp_path / "config.json").write_text("{}")
    _bad(tmp_path / "config.json", "is a file", "pass its folder")


def test_no_config(tmp_path: Path) -> None:
    _bad(tmp_path, "has no config.json")


def _folder_with(tmp_path: Path, config: dict[str, Any]) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_config_not_json_and_unsupported_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    _bad(tmp_path, "not readable JSON")
    _bad(_folder_with(tmp_path, {"model_type": "bert"}), "model_type 'bert'", "llama, mistral")
    _bad(_folder_with(tmp_path, {"hidden_size": 4}), "model_type None")


def test_config_missing_keys(tmp_path: Path) -> None:
    """The issue's story: {model_type: llama, hidden_size: 64} trained a 32-layer model."""
    _bad(_folder_with(tmp_path, {"model_type": "llama", "hidden_size": 64}),
         "lacks num_hidden_layers, num_attention_heads, vocab_size, intermediate_size",
         "fills no defaults")
    _bad(_folder_with(tmp_path, {"model_type": "gpt2", "n_embd": 64, "vocab_size": 8}),
         "lacks n_layer, n_head")


def test_no_weights_and_bin_weights(tmp_path: Path) -> None:
    folder = _folder_with(tmp_path, {"model_type": "llama", **LLAMA})
    _bad(folder, "has no weights", "model.safetensors.index.json")
    (folder / "pytorch_model.bin").write_bytes(b"")
    _bad(folder, "pytorch_model.bin", "not supported", "convert them to safetensors")


def test_index_with_a_missing_shard(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(folders["llama-sharded"], folder)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    _bad(folder, "lists 1 shard(s) the folder lacks", shard.name)


def test_weights_that_do_not_match_the_config(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(folders["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    for change, fragments in (
        ({"num_hidden_layers": 4}, ("9 missing (model.layers.3.self_attn.q_proj.weight",
                                    "and 6 more")),
        ({"num_hidden_layers": 2}, ("9 extra (model.layers.2.",)),
        ({"intermediate_size": 48}, ("misshaped", "[64, 32] in the file, [48, 32] in the config")),
        ({"tie_word_embeddings": True}, ()),  # a file's lm_head under a tie is not an error
    ):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        if fragments:
            _bad(folder, "do not match its config.json", *fragments)
        else:
            check_model_folder(folder)


def test_seq_len_beyond_positions_or_window(folders: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"outside 1\.\.64"):
        folder_parts(folders["llama"], seq_len=65)
    with pytest.raises(ConfigError, match="sliding window 16"):
        folder_parts(folders["mistral"], seq_len=17)


def test_qwen3_blocks_refuse_tensor_parallelism_by_name(folders: dict[str, Path]) -> None:
    """Qwen3's q/k norms share one weight over every head: tp > 1 is refused, not run wrong."""
    from stagewise.errors import ConfigError
    from stagewise.runtime.models.tp_plans import llama_plan

    parts = folder_parts(folders["qwen3"], seq_len=8, empty=False)
    block: Any = parts.layers[1]
    with pytest.raises(ConfigError, match=r"q_norm and k_norm.*tp=1"):
        llama_plan(block.block)
    llama: Any = folder_parts(folders["llama"], seq_len=8, empty=False).layers[1]
    assert llama_plan(llama.block) is not None  # the same layout without the norms shards
