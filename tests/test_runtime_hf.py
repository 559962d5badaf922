"""Hugging Face Llama and GPT-2 as pipeline layers, and models resolved by name.

The layers run in order must give the unsplit Hugging Face model's logits, loss and every
gradient (matched by parameter name; a tied weight's single gradient is the sum of both uses).
Pipelined on 2 ranks (1F1B and a split-backward schedule, GPT-2's tied embedding split across
ranks, a tied Llama under ZB-V with both copies on one rank) the loss and every gradient equal
a second copy of the unsplit model trained in one process on the whole batch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from stagewise.errors import ConfigError

if TYPE_CHECKING:  # mypy reads torch's types; at run time, skip without torch
    import torch
else:
    torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch import nn

from stagewise.runtime import launch
from stagewise.runtime.models.hf_models import build_hf_model, hf_layers, hf_parts
from stagewise.runtime.models.resolve import resolve_model
from stagewise.runtime.models.tiny_gpt import lm_loss
from workers.models import ModelCase, check_model_rank

LLAMA = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2,
}
GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 4}

MODELS = [
    ("llama", LLAMA),
    ("llama", {**LLAMA, "num_hidden_layers": 3, "tie_word_embeddings": True}),
    ("gpt2", GPT2),
    ("gpt2", {**GPT2, "attn_implementation": "eager"}),
]


class ToyLM(nn.Module):
    """A user's model for ``py:`` specs: embedding, blocks, head."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, dim)
        self.blocks = nn.ModuleList([nn.Linear(dim, dim), nn.Tanh()])
        self.head = nn.Linear(dim, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.head(x)
        return out


def toy_lm(dim: int = 8) -> ToyLM:
    """Factory named by ``py:test_runtime_hf:toy_lm``."""
    return ToyLM(dim)


def _run(layers: list[nn.Module], inputs: torch.Tensor) -> torch.Tensor:
    x = inputs
    for layer in layers:
        x = layer(x)
    return x


@pytest.mark.parametrize(("family", "config"), MODELS)
def test_layers_equal_the_unsplit_model(family: str, config: dict[str, Any]) -> None:
    parts = hf_parts(family, config, seed=5, seq_len=10)
    model = build_hf_model(family, config, seed=5)
    reference = build_hf_model(family, config, seed=5)
    layers, ties = hf_layers(model)
    # hf_parts is hf_layers of the seeded model.
    assert len(parts.layers) == len(layers) == int(config.get("num_hidden_layers", 2)) + 2
    assert parts.ties == ties
    for ours, theirs in zip(parts.layers, layers, strict=True):
        for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(),
                                     strict=True):
            torch.testing.assert_close(p, q, msg=name)
    inputs, targets = parts.make_batch(3, torch.Generator().manual_seed(1))
    assert inputs.shape == targets.shape == (3, 10)
    logits = _run(layers, inputs)
    expected = reference(input_ids=inputs)
    torch.testing.assert_close(logits, expected.logits)
    # Hugging Face's own loss shifts the labels, so it scores every position but the last.
    hf_loss = reference(input_ids=inputs, labels=inputs).loss
    torch.testing.assert_close(lm_loss(logits[:, :-1], targets[:, :-1]), hf_loss)
    parts.loss_fn(logits, targets).backward()
    lm_loss(expected.logits, targets).backward()
    ref_params = dict(reference.named_parameters())
    compared = 0
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, ref_params[name].grad, msg=name)
        compared += 1
    assert compared == len(ref_params)


@pytest.mark.parametrize(("family", "config", "tied"), [
    ("gpt2", GPT2, True),
    ("llama", LLAMA, False),
    ("llama", {**LLAMA, "tie_word_embeddings": True}, True),
])
def test_tied_embedding_is_one_parameter_and_a_tie(
    family: str, config: dict[str, Any], tied: bool
) -> None:
    parts = hf_parts(family, config)
    if not tied:
        assert parts.ties == ()
        return
    (tie,) = parts.ties
    last = len(parts.layers) - 1
    assert sorted(tie) == [0, last]
    first = parts.layers[0].get_parameter(tie[0])
    assert first is parts.layers[last].get_parameter(tie[last])


@pytest.mark.multiproc
def test_pipelined_models_equal_one_process() -> None:
    cases = [
        ModelCase("llama", "1f1b", LLAMA),
        ModelCase("llama", "zb-v", {**LLAMA, "tie_word_embeddings": True}),
        ModelCase("gpt2", "1f1b", GPT2),
        ModelCase("gpt2", "zb-h1", GPT2),
    ]
    results = launch(check_model_rank, 2, (cases, 60.0), timeout=150)
    assert len(results) == 2
    for rank, result in enumerate(results):
        assert set(result) == {case.label for case in cases}
        for label, problems in result.items():
            assert problems == [], f"rank {rank} {label}: {problems[:3]}"


def test_defaults_are_tiny_with_no_dropout() -> None:
    parts = hf_parts("gpt2")
    assert parts.name == "hf:gpt2"
    assert parts.seq_len == 32
    assert len(parts.layers) == 6
    assert all(m.p == 0.0 for layer in parts.layers for m in layer.modules()
               if isinstance(m, nn.Dropout))


def test_config_file_is_read_over_hugging_face_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1,
                                "hidden_size": 16, "intermediate_size": 32,
                                "num_attention_heads": 2, "vocab_size": 40}))
    parts = hf_parts("llama", path, seq_len=12)
    assert len(parts.layers) == 3
    inputs, _ = parts.make_batch(2, torch.Generator().manual_seed(0))
    assert inputs.shape == (2, 12)
    assert int(inputs.max()) < 40
    assert _run(list(parts.layers), inputs).shape == (2, 12, 40)


@pytest.mark.parametrize(("family", "config", "seq_len", "words"), [
    ("bert", None, None, "unknown Hugging Face model family 'bert': choose one of llama, gpt2"),
    ("llama", "/no/such/config.json", None, "does not exist"),
    ("llama", {"model_type": "gpt2"}, None, "model_type 'gpt2', not 'llama'"),
    ("gpt2", None, 129, "seq_len 129 is outside 1..128"),
    ("gpt2", {"attn_implementation": "flash_attention_2"}, None, "use one of sdpa, eager"),
])
def test_hf_errors_name_the_value_and_fix(
    family: str, config: Any, seq_len: int | None, words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        hf_parts(family, config, seq_len=seq_len)


def test_config_files_that_are_not_json_or_another_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not JSON"):
        hf_parts("gpt2", bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ConfigError, match=r"config file .*other\.json.* model_type 'mistral'"):
        hf_parts("llama", str(other))


def test_resolve_model_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model("tiny", seq_len=8).seq_len == 8
    parts = resolve_model("hf:gpt2", config=GPT2, seq_len=8)
    assert parts.name == "hf:gpt2"
    assert len(parts.layers) == 4
    assert parts.seq_len == 8
    made = resolve_model("py:stagewise.runtime.models.model_parts:tiny_gpt_parts")
    assert made.name == "tiny-gpt"
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    toy = resolve_model("py:test_runtime_hf:toy_lm", config={"dim": 4}, seq_len=6,
                        names=["embed", "blocks", "head"])
    assert len(toy.layers) == 4
    assert toy.layers[0].weight.shape == (16, 4)
    inputs, targets = toy.make_batch(2, torch.Generator().manual_seed(0))
    assert toy.loss_fn(_run(list(toy.layers), inputs), targets).ndim == 0


@pytest.mark.parametrize(("spec", "options", "words"), [
    ("bert", {}, r"model folder 'bert' does not exist: pass a local Hugging Face model folder"),
    ("hf:bert", {}, "choose one of llama, gpt2"),
    ("hf:gpt2", {"names": ["h"]}, "apply to py: models only"),
    ("tiny", {"config": {"n_layer": 2}}, "takes no --model-config"),
    ("py:no_such_module_here:f", {}, "cannot import 'no_such_module_here'"),
    ("py:stagewise.runtime.models.tiny_gpt", {}, "must be py:package.module:attr"),
    ("py:stagewise.runtime.models.tiny_gpt:nothing", {}, "has no 'nothing'"),
    ("py:stagewise.runtime.models.tiny_gpt:GPTConfig", {},
     "returned GPTConfig: return an nn.Module"),
    ("py:torch.nn:Identity", {"names": ["x"]}, "needs an nn.Embedding"),
    ("py:test_runtime_hf:toy_lm", {}, "name its submodules"),
    ("py:test_runtime_hf:toy_lm", {"config": {"width": 3}}, "calling .* failed"),
    ("py:test_runtime_hf:toy_lm", {"names": ["embed", "head"]}, "not in any named submodule"),
])
def test_resolve_model_errors(
    spec: str, options: dict[str, Any], words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    with pytest.raises(ConfigError, match=words):
        resolve_model(spec, **options)


def test_missing_transformers_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    with pytest.raises(ConfigError, match=r"pip install 'stagewise\[hf\]'"):
        hf_parts("gpt2")


@pytest.mark.multiproc
def test_importing_the_model_modules_does_not_import_transformers() -> None:
    code = (
        "import sys, stagewise.runtime, stagewise.runtime.models.resolve, "
        "stagewise.runtime.models.hf_models, "
        "stagewise.runtime.models.split_module, workers.models; "
        "print('transformers' in sys.modules)"
    )
    tests = str(Path(__file__).parent)  # workers.models lives in the tests folder
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True, cwd=tests)
    assert done.stdout.strip() == "False"


def test_an_empty_build_holds_no_weights_and_has_the_planned_parameter_count() -> None:
    """Llama-2-70B built empty: no memory for its 69 B parameters, shapes the planner counts."""
    from stagewise.plan.models import get_model, hf_family_and_config
    from stagewise.runtime.models.lazy_init import is_empty

    planned = get_model("llama-2-70b")
    family, fields = hf_family_and_config(planned)
    parts = hf_parts(family, fields, empty=True, seq_len=16)
    assert all(is_empty(layer) for layer in parts.layers)
    assert parts.materialize is not None
    count = sum(p.numel() for layer in parts.layers for p in layer.parameters())
    assert count == planned.num_params
    assert 68e9 < count < 70e9


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layers_filled_on_their_own_equal_the_whole_build(family: str) -> None:
    """What a rank fills for its stages is what a whole build holds (ties included)."""
    from stagewise.runtime.models.lazy_init import is_empty

    config = {**LLAMA, "tie_word_embeddings": True} if family == "llama" else GPT2
    whole = hf_parts(family, config, seed=3)
    empty = hf_parts(family, config, seed=3, empty=True)
    last = len(empty.layers) - 1
    assert empty.materialize is not None
    assert empty.ties  # tied embeddings in both families
    empty.materialize([empty.layers[last], empty.layers[2]])  # the head before the embedding
    assert is_empty(empty.layers[0])
    assert is_empty(empty.layers[1])
    empty.materialize([empty.layers[0]])
    for index in (0, 2, last):
        ours = dict(empty.layers[index].named_parameters())
        theirs = dict(whole.layers[index].named_parameters())
        assert ours.keys() == theirs.keys()
        for name, value in theirs.items():
            torch.testing.assert_close(ours[name], value, rtol=0, atol=0, msg=name)
    # Norms are one, biases zero, matrices drawn with the config's initializer_range.
    matrix = next(p for p in whole.layers[1].parameters() if p.dim() == 2)
    assert abs(float(matrix.detach().std()) - 0.02) < 0.004
    # Filled in one process, the tied embedding and head stay one Parameter.
    tie = empty.ties[0]
    (first, first_name), (other, other_name) = sorted(tie.items())
    assert (empty.layers[first].get_parameter(first_name)
            is empty.layers[other].get_parameter(other_name))
