"""Packed data as the trainer reads it: the global batch of each step, and the eval batches.

Epoch ``e`` is every packed sequence once, in the order of a permutation seeded by
``(seed, e)``; the epochs follow one another without end. The batch of step ``k`` (counted
from 0) with ``rows`` rows is rows ``[k * rows, (k + 1) * rows)`` of that endless sequence,
so it depends only on ``(seed, step, rows)``: a resumed run reads on where it stopped.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from stagewise.data.cache import cache_key, default_cache_dir, load_entry, save_entry
from stagewise.data.documents import Document, to_document
from stagewise.data.encode import Flags, Ids, encode, pack
from stagewise.data.errors import DataError
from stagewise.data.files import data_files, read_records
from stagewise.data.tokenizer import specials_of, tokenizer_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE_INDEX", "Batch", "PackedData", "load_packed"]

IGNORE_INDEX = -100  # a target not in the loss (cross_entropy's default ignore_index)
Batch = tuple[torch.Tensor, torch.Tensor]


class PackedData:
    """Packed token sequences of ``seq_len + 1`` tokens, served as (inputs, targets) batches.

    Args:
        tokens: ``(num_sequences, seq_len + 1)`` token ids.
        in_loss: ``(num_sequences, seq_len)``: whether each target is in the loss.
        seed: the seed of the per-epoch shuffles.
        meta: what :func:`load_packed` knows of the data (documents, tokens, files).
    """

    def __init__(self, tokens: Ids, in_loss: Flags, *, seed: int = 0,
                 meta: dict[str, Any] | None = None) -> None:
        if tokens.ndim != 2 or in_loss.shape != (tokens.shape[0], tokens.shape[1] - 1):
            raise DataError(f"packed tokens {tokens.shape} and in-loss flags {in_loss.shape} "
                            "do not match; delete the data cache folder and load again")
        self._tokens = tokens
        self._in_loss = in_loss
        self.seed = seed
        self.meta: dict[str, Any] = dict(meta or {})
        self._permutations: dict[int, npt.NDArray[np.int64]] = {}

    @property
    def num_sequences(self) -> int:
        """How many packed sequences there are (one epoch)."""
        return int(self._tokens.shape[0])

    @property
    def seq_len(self) -> int:
        """The length of each input and target row."""
        return int(self._tokens.shape[1]) - 1

    @functools.cached_property
    def vocab_needed(self) -> int:
        """The largest token id in the data plus one: the embedding must have at least this."""
        return int(self._tokens.max()) + 1

    def batch(self, step: int, rows: int) -> Batch:
        """The global batch of ``step`` (counted from 0): ``rows`` sequences as
        ``(inputs, targets)``, both ``LongTensor (rows, seq_len)``; targets not in the loss are
        ``-100``.

        Example::

            inputs, targets = data.batch(step, global_batch)
        """
        _check(step, rows)
        first = step * rows
        return self._rows(self._order(range(first, first + rows)))

    def position(self, step: int, rows: int) -> dict[str, int]:
        """Where the batch of ``step`` starts: ``{"epoch", "sequence", "sequences"}``, for
        checkpoints and logs (``sequence`` counts within the epoch, of ``sequences``)."""
        _check(step, rows)
        epoch, sequence = divmod(step * rows, self.num_sequences)
        return {"epoch": epoch, "sequence": sequence, "sequences": self.num_sequences}

    def eval_batches(self, rows: int, *, pad_last: bool = False) -> Iterator[Batch]:
        """Every sequence once, in stored order, in batches of ``rows``: for a loss over a
        whole eval set.

        The last batch has the rows that are left, or with ``pad_last`` is filled up to ``rows``
        with rows of padding whose targets are all ``-100`` (so that every batch splits into
        the same micro-batches; weigh the loss by the targets that are not ``-100``).
        """
        _check(0, rows)
        for first in range(0, self.num_sequences, rows):
            inputs, targets = self._rows(np.arange(first, min(first + rows, self.num_sequences)))
            missing = rows - len(inputs)
            if pad_last and missing:
                pad = int(self.meta.get("pad", 0))
                inputs = torch.cat([inputs, inputs.new_full((missing, self.seq_len), pad)])
                targets = torch.cat([targets, targets.new_full((missing, self.seq_len),
                                                               IGNORE_INDEX)])
            yield inputs, targets

    def num_eval_batches(self, rows: int) -> int:
        """How many batches :meth:`eval_batches` yields."""
        return -(-self.num_sequences // rows)

    def describe(self) -> str:
        """One line for logs: sequences, length, documents and tokens."""
        return (f"{self.num_sequences} sequences of {self.seq_len} tokens from "
                f"{self.meta.get('documents', '?')} documents ({self.meta.get('tokens', '?')} "
                f"tokens, {int(np.count_nonzero(self._in_loss))} targets in the loss)")

    def _order(self, positions: range) -> npt.NDArray[np.int64]:
        """The stored index of each position of the endless shuffled sequence."""
        indices = np.empty(len(positions), np.int64)
        for slot, position in enumerate(positions):
            epoch, offset = divmod(position, self.num_sequences)
            indices[slot] = self._permutation(epoch)[offset]
        return indices

    def _permutation(self, epoch: int) -> npt.NDArray[np.int64]:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            generator = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = generator.permutation(self.num_sequences)
        return self._permutations[epoch]

    def _rows(self, indices: npt.NDArray[np.int64]) -> Batch:
        tokens = torch.from_numpy(np.asarray(self._tokens[indices], dtype=np.int64))
        in_loss = torch.from_numpy(np.asarray(self._in_loss[indices], dtype=np.bool_))
        targets = tokens[:, 1:].masked_fill(~in_loss, IGNORE_INDEX)
        return tokens[:, :-1].contiguous(), targets


def _check(step: int, rows: int) -> None:
    if step < 0 or rows < 1:
        raise DataError(f"batch of step {step} with {rows} rows: step must be >= 0 and "
                        "rows >= 1")


def load_packed(paths: Sequence[str | Path] | str | Path, tokenizer: PreTrainedTokenizerBase,
                *, seq_len: int, seed: int = 0, cache_dir: str | Path | None = None,
                progress: bool = False) -> PackedData:
    """Read, tokenise and pack data files, or take them from the cache.

    Args:
        paths: data files (``.txt``, ``.jsonl``, ``.json``, ``.parquet``, ``.arrow``) or
            folders of them.
        tokenizer: the model's tokenizer (:func:`~stagewise.data.load_tokenizer`).
        seq_len: the length of each input row (sequences hold ``seq_len + 1`` tokens).
        seed: the seed of the per-epoch shuffles (not part of the cache key).
        cache_dir: the cache folder; default :func:`~stagewise.data.cache.default_cache_dir`.
        progress: show a progress bar on stderr while tokenising.

    Returns:
        The packed data.

    Raises:
        DataError: a bad path, file, record or tokenizer, or too little data.

    Example::

        data = load_packed(["train.jsonl"], load_tokenizer("./my-llama"), seq_len=512)
        inputs, targets = data.batch(0, 8)
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, not {seq_len}")
    files = data_files([paths] if isinstance(paths, (str, Path)) else list(paths))
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache / "packed" / cache_key(files, tokenizer_fingerprint(tokenizer), seq_len)
    cached = load_entry(folder)
    if cached is not None:
        (tokens, in_loss), meta = cached
        return PackedData(tokens, in_loss, seed=seed, meta=meta)
    specials = specials_of(tokenizer)
    ids, flags, documents = encode(_documents(files, tokenizer), tokenizer, specials,
                                   progress=progress)
    if documents == 0 or len(ids) == 0:
        raise DataError(f"the data in {', '.join(map(str, files))} holds no tokens (no "
                        "non-empty document); check the files")
    packed = pack(ids, flags, seq_len, specials.pad)
    meta = {"documents": documents, "tokens": len(ids), "seq_len": seq_len, "pad": specials.pad,
            "files": [str(path) for path in files]}
    save_entry(folder, packed, meta)
    return PackedData(*packed, seed=seed, meta=meta)


def _documents(files: Sequence[Path], tokenizer: PreTrainedTokenizerBase
               ) -> Iterator[Document]:
    for path in files:
        for record in read_records(path):
            document = to_document(record, tokenizer)
            if document is not None:
                yield document
