"""Fine-tuning a Hugging Face folder on your data with ``stagewise train``, end to end.

A tiny Llama and its tokenizer are built and saved inside the tests (nothing is downloaded).
The references are Hugging Face's own: ``AutoModelForCausalLM.from_pretrained`` on one
process, its loss computed from ``labels`` with -100 where a token is out of the loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from stagewise.cli import cli

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

SENTENCES = [
    "the pipeline splits the model into stages and each stage runs on its own rank",
    "micro batches flow forward through the stages and gradients flow back",
    "the bubble is the time a stage waits for its neighbours",
    "more micro batches make the bubble smaller and interleaving makes it smaller still",
    "a checkpoint keyed by layer can be read by any layout of ranks",
] * 6
SEQ = 16
GLOBAL = 8


def _tokenizer(folder: Path) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    raw.train_from_iterator([*SENTENCES, "question answer : ?"], trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block Llama (width 32, 4 heads, 2 kv heads) with its word-level tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _tokenizer(folder)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="40KB")
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    return path


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    rows = [{"prompt": f"question : {s.split()[1]} ? answer : ", "completion": s}
            for s in SENTENCES]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code = cli(["train", "--json", "--no-plots", "--seq-len", str(SEQ), "--global-batch",
                str(GLOBAL), "-m", "4", "--timeout", "60", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    report: dict[str, Any] = json.loads(captured.out[captured.out.index("{"):])
    return report


def _hf_loss(model_dir: Path, data: Path, step: int = 0) -> float:
    """Hugging Face's loss on step ``step``'s global batch: the model in one process, labels
    -100 where stagewise's targets are out of the loss."""
    from stagewise.data import load_packed, load_tokenizer

    packed = load_packed([data], load_tokenizer(model_dir), seq_len=SEQ, seed=0)
    inputs, targets = packed.batch(step, GLOBAL)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # input_ids one longer so that HF's shift makes labels[1:] the targets (the last token
    # is an input only and its logits are dropped by the shift).
    last = targets[:, -1:].clamp(min=0)
    ids = torch.cat([inputs, last], dim=1)
    labels = torch.cat([torch.full_like(last, -100), targets], dim=1)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    return float(loss)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize(("mesh", "rel"), [("pp=2", 1e-5), ("pp=2,tp=2", 1e-4),
                                           ("pp=2,dp=2", 1e-5)])
def test_first_step_loss_equals_from_pretrained(
    model_dir: Path, text_file: Path, capsys: pytest.CaptureFixture[str], mesh: str, rel: float,
) -> None:
    report = _train(capsys, "--model", str(model_dir), "--data", str(text_file), "--mesh", mesh,
                    "--steps", "2")
    # float32 sums in another order (and, with tp, split over ranks): a stated tolerance.
    assert report["losses"][0] == pytest.approx(_hf_loss(model_dir, text_file), rel=rel)


@pytest.mark.multiproc
@pytest.mark.slow
def test_prompt_tokens_are_out_of_the_loss_as_hf_labels_say(
    model_dir: Path, qa_file: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from stagewise.data import load_packed, load_tokenizer

    packed = load_packed([qa_file], load_tokenizer(model_dir), seq_len=SEQ, seed=0)
    _, targets = packed.batch(0, GLOBAL)
    masked = int((targets == -100).sum())
    assert 0 < masked < targets.numel()  # prompts are masked, answers are not
    report = _train(capsys, "--model", str(model_dir), "--data", str(qa_file), "-p", "2",
                    "--steps", "2")
    assert report["losses"][0] == pytest.approx(_hf_loss(model_dir, qa_file), rel=1e-5)


@pytest.mark.multiproc
@pytest.mark.slow
def test_export_gives_the_final_weights_to_from_pretrained(
    model_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from stagewise.runtime.checkpoint.state import latest_checkpoint, load_checkpoint
    from stagewise.runtime.models.hf_folder import folder_parts

    out, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    report = _train(capsys, "--model", str(model_dir), "--data", str(text_file), "-p", "2",
                    "--steps", "3", "--checkpoint-dir", str(ckpt), "--save-every", "3",
                    "--export-hf", str(out), "--eval-data", str(text_file))
    assert report["exported"] == str(out)
    assert report["eval"][-1]["perplexity"] == pytest.approx(
        float(torch.tensor(report["eval"][-1]["loss"]).exp()), rel=1e-6)
    # The final stagewise weights: the last checkpoint, loaded into the folder's layers.
    parts = folder_parts(model_dir, seq_len=SEQ, empty=False)
    step = latest_checkpoint(ckpt, required=True)
    assert step is not None
    load_checkpoint(step, dict(enumerate(parts.layers)))
    ids = torch.randint(0, 20, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = ids
        for layer in parts.layers:
            ours = layer(ours)
        exported = transformers.AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        before = transformers.AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids)
    torch.testing.assert_close(exported, ours)
    assert not torch.allclose(before.logits, ours)  # training changed the weights


@pytest.mark.multiproc
@pytest.mark.slow
def test_a_resumed_run_continues_the_data_where_it_stopped(
    model_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    common = ("--model", str(model_dir), "--data", str(text_file), "-p", "2")
    whole = _train(capsys, *common, "--steps", "6")["losses"]
    folder = str(tmp_path / "ckpt")
    first = _train(capsys, *common, "--steps", "4", "--checkpoint-dir", folder,
                   "--save-every", "2")["losses"]
    resumed = _train(capsys, *common, "--steps", "6", "--checkpoint-dir", folder, "--resume")
    assert first == whole[:4]
    assert resumed["resumed_from"] == 4
    assert resumed["losses"] == whole  # same layout, same data: bit for bit


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli(["train", "--no-plots", "-p", "2", "-m", "2", "--steps", "2", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_model_folders_and_data_are_refused_before_launch(
    model_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    model = str(model_dir)
    assert "nothing is downloaded" in _refused(capsys, "--model", "meta-llama/Llama-3.2-1B")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json" in _refused(capsys, "--model", str(empty))
    no_text = tmp_path / "bad.jsonl"
    no_text.write_text(json.dumps({"body": "x"}) + "\n")
    assert "body" in _refused(capsys, "--model", model, "--data", str(no_text))
    nothing = tmp_path / "nothing.txt"
    nothing.write_text("")
    assert "empty" in _refused(capsys, "--model", model, "--data", str(nothing)).lower()
    assert "positions" in _refused(capsys, "--model", model, "--data", str(text_file),
                                   "--seq-len", "100")
    assert "needs a tokenizer" in _refused(capsys, "--data", str(text_file))


def test_a_tokenizer_larger_than_the_embedding_is_refused(
    model_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    for file in model_dir.iterdir():
        if file.name.startswith("tokenizer"):  # the tokenizer only, not the weights
            (small / file.name).write_bytes(file.read_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        **config, "vocab_size": 8}))
    model.save_pretrained(small)
    capsys.readouterr()
    err = _refused(capsys, "--model", str(small), "--data", str(text_file))
    assert "embedding has 8 rows" in err
