"""stagewise.data: formats, packing and loss masks against hand tokenisation, batches by seed
and step, the cache, and every bad-input message.

The tokenizer is a word-level one built here (one id per word, specials as words), so the
expected ids are written by hand from :data:`VOCAB`; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from stagewise.data import DataError, PackedData, load_packed, load_tokenizer
from stagewise.data.encode import pack
from stagewise.errors import ConfigError

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "hi", "there", "hello", "how",
         "are", "you", "fine"]
VOCAB = {token: index for index, token in enumerate(SPECIALS + WORDS)}
PAD, BOS, EOS = VOCAB["<pad>"], VOCAB["<s>"], VOCAB["</s>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def save_tokenizer(folder: Path, *, chat_template: bool = True, eos: bool = True) -> Path:
    """A word-level tokenizer that puts BOS before each text, saved to ``folder``."""
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", BOS)])
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>" if eos else None, pad_token="<pad>",
                                        unk_token="<unk>")
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def ids(text: str) -> list[int]:
    """Tokenised by hand: one id per whitespace-separated word."""
    return [VOCAB[word] for word in text.split()]


def stream(*parts: tuple[str, bool]) -> list[tuple[int, bool]]:
    """(token, in loss) pairs, from (words, in loss) parts."""
    return [(token, in_loss) for words, in_loss in parts for token in ids(words)]


def rows_of(pairs: list[tuple[int, bool]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packing rule written out: rows of seq_len + 1, padded, rows without loss dropped."""
    width = seq_len + 1
    pairs = pairs + [(PAD, False)] * (-len(pairs) % width)
    inputs, targets = [], []
    for start in range(0, len(pairs), width):
        row = pairs[start:start + width]
        target = [token if in_loss else -100 for token, in_loss in row[1:]]
        if any(t != -100 for t in target):
            inputs.append([token for token, _ in row[:-1]])
            targets.append(target)
    return torch.tensor(inputs), torch.tensor(targets)


def all_rows(data: PackedData) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(data.eval_batches(3))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def tokenizer(tmp_path: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(save_tokenizer(tmp_path / "model"))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# --- formats, packing and loss masks ---------------------------------------------------------


def test_load_tokenizer_reads_the_saved_folder(tokenizer: PreTrainedTokenizerBase) -> None:
    assert tokenizer("the cat")["input_ids"] == [BOS, *ids("the cat")]
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_text_files_are_documents_with_bos_and_eos(tmp_path: Path,
                                                   tokenizer: PreTrainedTokenizerBase,
                                                   cache: Path) -> None:
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.txt").write_text("a dog ran\n")
    (folder / "a.txt").write_text("the cat\nsat\n\non a mat\n")
    data = load_packed(folder, tokenizer, seq_len=4, cache_dir=cache)
    inputs, targets = all_rows(data)
    # a.txt then b.txt (sorted), each one document: <s> words </s>; BOS is never a target
    s, c, e, p = BOS, VOCAB["cat"], EOS, PAD
    the, sat, on, a, mat, dog, ran = ids("the sat on a mat dog ran")
    assert inputs.tolist() == [[s, the, c, sat], [a, mat, e, s], [dog, ran, e, p]]
    assert targets.tolist() == [[the, c, sat, on], [mat, e, -100, a], [ran, e, -100, -100]]
    assert data.num_sequences == 3
    assert data.vocab_needed == max(VOCAB[w] for w in ("ran", "dog", "mat")) + 1


def test_jsonl_text_prompt_completion_and_chat(tmp_path: Path, tokenizer: PreTrainedTokenizerBase,
                                               cache: Path) -> None:
    chat = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"text": "the cat sat", "id": 1},
        {"prompt": "how are you ", "completion": "fine", "text": None},
        {"messages": chat},
    ])
    expected = stream(
        ("<s>", False), ("the cat sat </s>", True),
        ("<s> how are you", False), ("fine </s>", True),
        ("<s> <|user|> hi there <|end|> <|assistant|>", False), ("hello <|end|>", True),
        ("<|user|> how are you <|end|> <|assistant|>", False), ("fine <|end|> </s>", True))
    data = load_packed([path], tokenizer, seq_len=5, cache_dir=cache)
    want_inputs, want_targets = rows_of(expected, 5)
    inputs, targets = all_rows(data)
    assert torch.equal(inputs, want_inputs)
    assert torch.equal(targets, want_targets)
    assert data.meta["documents"] == 3
    assert data.meta["tokens"] == len(expected)


def test_json_array_and_blank_lines(tmp_path: Path, tokenizer: PreTrainedTokenizerBase,
                                    cache: Path) -> None:
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": "the cat"}, {"text": "a dog"}]))
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "the cat"}\n\n{"text": "a dog"}\n')
    expected = rows_of(stream(("<s>", False), ("the cat </s>", True), ("<s>", False),
                              ("a dog </s>", True)), 3)
    for path in (array, lines):
        got = all_rows(load_packed(path, tokenizer, seq_len=3, cache_dir=cache))
        assert all(torch.equal(g, w) for g, w in zip(got, expected, strict=True))


def write_table(path: Path, table: pa.Table) -> None:
    if path.suffix == ".parquet":
        pq.write_table(table, path)
        return
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_parquet_and_arrow_rows_follow_the_field_rules(tmp_path: Path,
                                                       tokenizer: PreTrainedTokenizerBase,
                                                       cache: Path, suffix: str) -> None:
    table = pa.table({"prompt": ["how are you ", None], "completion": ["fine", None],
                      "text": [None, "the cat sat"]})
    path = tmp_path / f"rows{suffix}"
    write_table(path, table)
    expected = stream(("<s> how are you", False), ("fine </s>", True),
                      ("<s>", False), ("the cat sat </s>", True))
    got = all_rows(load_packed(path, tokenizer, seq_len=4, cache_dir=cache))
    assert all(torch.equal(g, w) for g, w in zip(got, rows_of(expected, 4), strict=True))


def test_a_byte_level_bpe_masks_the_prompt_by_character(tmp_path: Path, cache: Path) -> None:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["Question: how are you? Answer: fine, thanks."] * 5, trainer)
    PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path / "bpe")
    bpe = load_tokenizer(tmp_path / "bpe")
    prompt, completion = "Question: how are you? Answer:", " fine, thanks."
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": prompt, "completion": completion}])
    full = bpe(prompt + completion)["input_ids"]
    in_prompt = len(bpe(prompt)["input_ids"])
    assert full[:in_prompt] == bpe(prompt)["input_ids"]  # the test's premise
    eos = bpe.eos_token_id
    seq_len = len(full)  # one row: <tokens> <eos>
    inputs, targets = all_rows(load_packed(path, bpe, seq_len=seq_len, cache_dir=cache))
    assert inputs.tolist() == [full]
    assert targets.tolist() == [[-100] * (in_prompt - 1) + [*full[in_prompt:], eos]]


def test_a_folder_reads_its_supported_files_sorted(tmp_path: Path,
                                                   tokenizer: PreTrainedTokenizerBase,
                                                   cache: Path) -> None:
    folder = tmp_path / "mix"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    (folder / "b.txt").write_text("dog")
    (folder / "a.txt").write_text("cat")
    write_jsonl(folder / "sub" / "c.jsonl", [{"text": "mat"}])
    (folder / "README.md").write_text("not data")
    (folder / ".hidden" / "d.txt").write_text("hi")
    data = load_packed(folder, tokenizer, seq_len=2, cache_dir=cache)
    assert [Path(f).name for f in data.meta["files"]] == ["a.txt", "b.txt", "c.jsonl"]
    assert all_rows(data)[0][:, 1].tolist() == ids("cat dog mat")


def test_empty_documents_and_chats_without_an_assistant_are_skipped(
        tmp_path: Path, tokenizer: PreTrainedTokenizerBase, cache: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "  "}, {"prompt": "hi", "completion": ""},
        {"messages": [{"role": "user", "content": "hi"}]}, {"text": "the cat"}])
    data = load_packed(path, tokenizer, seq_len=3, cache_dir=cache)
    assert data.meta["documents"] == 1
    assert all_rows(data)[0].tolist() == [[BOS, *ids("the cat")]]


def test_rows_with_nothing_in_the_loss_are_dropped(tmp_path: Path,
                                                   tokenizer: PreTrainedTokenizerBase,
                                                   cache: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the cat sat on a mat ",
                                               "completion": "dog"}])
    inputs, targets = all_rows(load_packed(path, tokenizer, seq_len=3, cache_dir=cache))
    # rows <s> the cat sat | on a mat dog | </s> <pad> <pad> <pad>: the first has only prompt
    # targets, the last none (the first token of a row is an input only): both dropped
    assert inputs.tolist() == [ids("on a mat")]
    assert targets.tolist() == [[-100, -100, VOCAB["dog"]]]


# --- batches: by seed and step, epochs, eval -------------------------------------------------


@pytest.fixture
def ten_rows(tmp_path: Path, tokenizer: PreTrainedTokenizerBase, cache: Path) -> Path:
    """A file that packs into exactly ten rows of seq_len 3 (each document is 4 tokens)."""
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "hi", "there"]
    return write_jsonl(tmp_path / "ten.jsonl", [{"text": f"{w} {w}"} for w in words])


def test_batches_are_the_seeded_epoch_permutations(ten_rows: Path,
                                                   tokenizer: PreTrainedTokenizerBase,
                                                   cache: Path) -> None:
    data = load_packed(ten_rows, tokenizer, seq_len=3, seed=7, cache_dir=cache)
    assert data.num_sequences == 10
    stored_inputs, stored_targets = all_rows(data)
    order = np.concatenate([np.random.default_rng([7, epoch]).permutation(10)
                            for epoch in range(3)])
    for step in range(7):  # rows 4: step 2 spans the boundary of epochs 0 and 1
        inputs, targets = data.batch(step, 4)
        picked = order[step * 4:(step + 1) * 4]
        assert torch.equal(inputs, stored_inputs[picked])
        assert torch.equal(targets, stored_targets[picked])
        assert inputs.dtype == targets.dtype == torch.int64
    assert data.position(2, 4) == {"epoch": 0, "sequence": 8, "sequences": 10}
    assert data.position(3, 4) == {"epoch": 1, "sequence": 2, "sequences": 10}


def test_each_sequence_once_per_epoch(ten_rows: Path, tokenizer: PreTrainedTokenizerBase,
                                      cache: Path) -> None:
    data = load_packed(ten_rows, tokenizer, seq_len=3, cache_dir=cache)
    for epoch in range(2):
        seen = torch.cat([data.batch(step, 5)[0] for step in (2 * epoch, 2 * epoch + 1)])
        assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, all_rows(data)[0].tolist()))


def test_batches_are_a_function_of_seed_step_and_rows(ten_rows: Path,
                                                      tokenizer: PreTrainedTokenizerBase,
                                                      cache: Path) -> None:
    first = load_packed(ten_rows, tokenizer, seq_len=3, seed=1, cache_dir=cache)
    again = load_packed(ten_rows, tokenizer, seq_len=3, seed=1, cache_dir=cache)
    other = load_packed(ten_rows, tokenizer, seq_len=3, seed=2, cache_dir=cache)
    steps = [5, 0, 3, 1]  # any order: a resumed run asks for step k first
    batches = [first.batch(step, 4)[0] for step in steps]
    assert all(torch.equal(b, again.batch(s, 4)[0]) for b, s in zip(batches, steps, strict=True))
    assert not all(torch.equal(b, other.batch(s, 4)[0])
                   for b, s in zip(batches, steps, strict=True))


def test_eval_batches_cover_every_sequence_in_order(ten_rows: Path,
                                                    tokenizer: PreTrainedTokenizerBase,
                                                    cache: Path) -> None:
    data = load_packed(ten_rows, tokenizer, seq_len=3, cache_dir=cache)
    batches = list(data.eval_batches(4))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert data.num_eval_batches(4) == 3
    inputs, targets = list(data.eval_batches(4, pad_last=True))[-1]
    assert torch.equal(inputs[:2], batches[-1][0])
    assert inputs[2:].eq(PAD).all()
    assert targets[2:].eq(-100).all()
    first_words = torch.cat([b[0] for b in batches])[:, 1].tolist()
    assert first_words == ids("the cat sat on a mat dog ran hi there")


# --- the cache -------------------------------------------------------------------------------


def refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("the tokenizer was called")


def test_a_second_load_reads_the_cache(ten_rows: Path, tokenizer: PreTrainedTokenizerBase,
                                       cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_packed(ten_rows, tokenizer, seq_len=3, cache_dir=cache)
    assert len(list((cache / "packed").iterdir())) == 1
    monkeypatch.setattr(type(tokenizer), "__call__", refuse)
    monkeypatch.setattr(type(tokenizer), "apply_chat_template", refuse)
    second = load_packed([str(ten_rows)], tokenizer, seq_len=3, seed=5, cache_dir=cache)
    assert all(torch.equal(a, b) for a, b in zip(all_rows(first), all_rows(second), strict=True))
    assert second.meta == first.meta
    assert not list(cache.glob("packed/.*"))  # no temporary folder left behind


def test_a_changed_file_tokenizer_or_seq_len_misses_the_cache(tmp_path: Path, ten_rows: Path,
                                                              tokenizer: PreTrainedTokenizerBase,
                                                              cache: Path) -> None:
    load_packed(ten_rows, tokenizer, seq_len=3, cache_dir=cache)
    write_jsonl(ten_rows, [{"text": "the cat sat"}])  # a new size
    assert load_packed(ten_rows, tokenizer, seq_len=3, cache_dir=cache).num_sequences == 1
    stat = ten_rows.stat()
    os.utime(ten_rows, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, touched
    load_packed(ten_rows, tokenizer, seq_len=3, cache_dir=cache)
    load_packed(ten_rows, tokenizer, seq_len=2, cache_dir=cache)
    other = load_tokenizer(save_tokenizer(tmp_path / "other", chat_template=False))
    load_packed(ten_rows, other, seq_len=2, cache_dir=cache)
    assert len(list((cache / "packed").iterdir())) == 5


def test_default_cache_dir_follows_xdg(tmp_path: Path, ten_rows: Path,
                                       tokenizer: PreTrainedTokenizerBase,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_packed(ten_rows, tokenizer, seq_len=3)
    assert len(list((tmp_path / "xdg" / "stagewise" / "packed").iterdir())) == 1


def test_progress_bar_only_when_asked(tmp_path: Path, ten_rows: Path,
                                      tokenizer: PreTrainedTokenizerBase,
                                      capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    load_packed(ten_rows, tokenizer, seq_len=3, cache_dir=tmp_path / "quiet")
    assert capsys.readouterr().err == ""
    load_packed(ten_rows, tokenizer, seq_len=3, cache_dir=tmp_path / "piped", progress=True)
    assert capsys.readouterr().err == ""  # the bar shows on a terminal only
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    load_packed(ten_rows, tokenizer, seq_len=3, cache_dir=tmp_path / "loud", progress=True)
    assert "tokenising" in capsys.readouterr().err


# --- bad input: one line each, naming the file and the fix ----------------------------------

CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]}'


@pytest.mark.parametrize(("files", "path", "seq_len", "expected"), [
    ({}, "missing.jsonl", 3, ["missing.jsonl does not exist", ".txt, .jsonl, .json"]),
    ({"d.csv": "text\n"}, "d.csv", 3, ["d.csv: unsupported data file type '.csv'",
                                        "supported: .txt, .jsonl, .json, .parquet, .arrow"]),
    ({"sub/notes.md": "x"}, "sub", 3, ["sub holds no supported files (.txt,"]),
    ({"d.jsonl": '{"text": "the"}\n{"text": "cat"\n'}, "d.jsonl", 3,
     ["d.jsonl:2: not JSON", "one JSON object"]),
    ({"d.jsonl": '["the cat"]\n'}, "d.jsonl", 3, ["d.jsonl:1: a JSON list where an object"]),
    ({"d.json": '[{"text": "the"}, 3]'}, "d.json", 3, ["d.json: item 1: a JSON int"]),
    ({"d.json": '[{"text": "the"},'}, "d.json", 3, ["d.json:1: not JSON"]),
    ({"d.jsonl": '{"text": "the"}\n{"body": "cat", "id": 2}\n'}, "d.jsonl", 3,
     ["d.jsonl:2: a record with no 'text' field (nor 'prompt' + 'completion', nor 'messages')",
      "it has ['body', 'id']", "name the field that holds the text 'text'"]),
    ({"d.jsonl": '{"prompt": "the"}\n'}, "d.jsonl", 3,
     ["d.jsonl:1: a 'prompt' without a 'completion'"]),
    ({"d.jsonl": '{"text": 3}\n'}, "d.jsonl", 3, ["d.jsonl:1: 'text' is a int; it must be a"]),
    ({"d.jsonl": '{"messages": "hi"}\n'}, "d.jsonl", 3,
     ["d.jsonl:1: 'messages' must be a list of"]),
    ({"d.txt": "", "e.jsonl": '{"text": " "}\n'}, ".", 3,
     ["holds no tokens", "d.txt", "e.jsonl"]),
    ({"d.txt": "the cat"}, "d.txt", 4,
     ["has 4 tokens, too few for one sequence", "seq_len 4 needs 5 tokens per sequence"]),
    ({"d.txt": b"the \xff cat"}, "d.txt", 2, ["d.txt: not UTF-8 text", "convert it to UTF-8"]),
    ({"d.parquet": "not parquet"}, "d.parquet", 2, ["d.parquet: cannot read it as parquet"]),
    ({"d.txt": "the cat sat"}, "d.txt", 0, ["seq_len must be >= 1, not 0"]),
])
def test_bad_data_is_one_line_with_the_file(tmp_path: Path, tokenizer: PreTrainedTokenizerBase,
                                            cache: Path, monkeypatch: pytest.MonkeyPatch,
                                            files: dict[str, str | bytes], path: str, seq_len: int,
                                            expected: list[str]) -> None:
    folder = tmp_path / "data"
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(content)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_packed(folder / path, tokenizer, seq_len=seq_len, cache_dir=cache)
    message = str(caught.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_packing_refuses_data_with_nothing_in_the_loss() -> None:
    tokens = np.arange(6, dtype=np.int32)
    with pytest.raises(DataError, match="no sequence has a token in the loss"):
        pack(tokens, np.array([True, False, True, False, True, False]), 1, PAD)
    rows, in_loss = pack(tokens, np.array([True, True, False, False, True, True]), 1, PAD)
    assert rows.tolist() == [[0, 1], [4, 5]]
    assert in_loss.tolist() == [[True], [True]]


def test_chat_needs_a_chat_template(tmp_path: Path, cache: Path) -> None:
    plain = load_tokenizer(save_tokenizer(tmp_path / "plain", chat_template=False))
    path = tmp_path / "chat.jsonl"
    path.write_text(CHAT + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:1: chat 'messages' need a chat template "
                       r"and the tokenizer in .*plain has none"):
        load_packed(path, plain, seq_len=2, cache_dir=cache)


def test_a_tokenizer_without_eos_is_refused(tmp_path: Path, cache: Path) -> None:
    no_eos = load_tokenizer(save_tokenizer(tmp_path / "no_eos", eos=False))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat"}])
    with pytest.raises(DataError, match="defines no eos_token, which separates documents"):
        load_packed(path, no_eos, seq_len=2, cache_dir=cache)


def test_load_tokenizer_needs_a_local_folder_with_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"tokenizer folder .*absent does not exist; pass a "
                       "local model folder"):
        load_tokenizer(tmp_path / "absent")
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only" / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"weights_only has no tokenizer files .* "
                       r"tokenizer.save_pretrained"):
        load_tokenizer(tmp_path / "weights_only")


@pytest.mark.parametrize(("step", "rows"), [(-1, 2), (0, 0)])
def test_batch_refuses_a_negative_step_or_no_rows(ten_rows: Path,
                                                  tokenizer: PreTrainedTokenizerBase, cache: Path,
                                                  step: int, rows: int) -> None:
    data = load_packed(ten_rows, tokenizer, seq_len=3, cache_dir=cache)
    with pytest.raises(DataError, match="step must be >= 0 and rows >= 1"):
        data.batch(step, rows)
