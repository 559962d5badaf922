"""Documents to one token stream, and the stream to packed sequences.

The stream is every document's tokens, one after the other, each document ended by EOS;
beside it, one flag per token: whether the token is a target in the loss. Packing cuts the
stream into rows of ``seq_len + 1`` tokens (inputs ``row[:-1]``, targets ``row[1:]``).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from stagewise.data.documents import Document
from stagewise.data.errors import DataError
from stagewise.data.tokenizer import Specials

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Packed", "encode", "pack", "tokens_of"]

Ids = npt.NDArray[np.int32]
Flags = npt.NDArray[np.bool_]
Packed = tuple[Ids, Flags]

_CHUNK = 256  # documents tokenised per call (the fast tokenizer works on a batch in parallel)


def encode(documents: Iterable[Document], tokenizer: PreTrainedTokenizerBase,
           specials: Specials, *, progress: bool = False) -> tuple[Ids, Flags, int]:
    """Tokenise ``documents`` into one stream.

    Returns:
        The token ids, the in-loss flag of each token, and the number of documents kept (a
        document with no token in the loss, such as one that tokenises to nothing, is skipped).

    Raises:
        DataError: a document has loss spans and the tokenizer is not a fast one.
    """
    ids: list[Ids] = [np.zeros(0, np.int32)]
    flags: list[Flags] = [np.zeros(0, np.bool_)]
    count = 0
    # On a terminal only (disable=None), so logs and pipes get no bar.
    with tqdm(desc="tokenising", unit=" docs", file=sys.stderr,
              disable=None if progress else True) as bar:
        stream = iter(documents)
        while chunk := tuple(itertools.islice(stream, _CHUNK)):
            for doc_ids, doc_flags in _encode_chunk(chunk, tokenizer, specials):
                if doc_flags.any():  # else it tokenised to nothing to learn: skipped
                    ids.append(doc_ids)
                    flags.append(doc_flags)
                    count += 1
            bar.update(len(chunk))
    return np.concatenate(ids), np.concatenate(flags), count


def _encode_chunk(chunk: Sequence[Document], tokenizer: PreTrainedTokenizerBase,
                  specials: Specials) -> list[Packed]:
    if not tokenizer.is_fast and any(doc.loss_spans is not None for doc in chunk):
        raise DataError(
            f"the tokenizer in {tokenizer.name_or_path} is not a fast one (no tokenizer.json), "
            "which prompt/completion and chat data need to find the completion's tokens")
    encoded = tokenizer([doc.text for doc in chunk], add_special_tokens=False,
                        return_offsets_mapping=bool(tokenizer.is_fast))
    offsets = encoded["offset_mapping"] if tokenizer.is_fast else [None] * len(chunk)
    return [tokens_of(doc, list(doc_ids), doc_offsets, specials)
            for doc, doc_ids, doc_offsets in zip(chunk, encoded["input_ids"], offsets,
                                                 strict=True)]


def tokens_of(document: Document, ids: list[int], offsets: Sequence[Sequence[int]] | None,
              specials: Specials) -> Packed:
    """One document's tokens and in-loss flags, with its BOS/EOS.

    ``ids`` and ``offsets`` (character ``(start, end)`` per token) are the tokenizer's output
    for ``document.text`` without special tokens. A token is in the loss when it holds a
    character of a loss span. The tokenizer's prefix (BOS) is never in the loss; its suffix and
    the EOS added when the document does not already end with one are in the loss when the
    document's last token is.
    """
    flags = np.ones(len(ids), np.bool_)
    if document.loss_spans is not None:
        assert offsets is not None, "loss spans need offsets"
        spans = np.asarray(offsets, np.int64).reshape(-1, 2)
        starts, ends = spans[:, 0], np.maximum(spans[:, 1], spans[:, 0] + 1)
        flags[:] = False
        for start, end in document.loss_spans:
            flags |= (starts < end) & (ends > start)
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    if document.add_special_tokens:
        prefix, suffix = specials.prefix, specials.suffix
    tokens = [*prefix, *ids, *suffix]
    if not tokens or tokens[-1] != specials.eos:
        tokens.append(specials.eos)
    last = bool(flags[-1]) if len(flags) else False
    tail = np.full(len(tokens) - len(prefix) - len(ids), last, np.bool_)
    return (np.asarray(tokens, np.int32),
            np.concatenate([np.zeros(len(prefix), np.bool_), flags, tail]))


def pack(ids: Ids, flags: Flags, seq_len: int, pad: int) -> Packed:
    """Cut the stream into rows of ``seq_len + 1`` tokens.

    The last, partial row is padded with ``pad`` (its padding is not in the loss). A row with
    no target in the loss (all prompt, say) is dropped, so no batch row has an empty loss.

    Returns:
        The rows of token ids ``(num_sequences, seq_len + 1)`` and the in-loss flag of each
        row's targets ``(num_sequences, seq_len)``.

    Raises:
        DataError: the stream is shorter than one row, or no row has a target in the loss.
    """
    width = seq_len + 1
    if len(ids) < width:
        raise DataError(
            f"the data has {len(ids)} tokens, too few for one sequence: seq_len {seq_len} "
            f"needs {width} tokens per sequence (seq_len + 1); give more data or a smaller "
            "seq_len")
    rest = len(ids) % width
    if rest:
        ids = np.concatenate([ids, np.full(width - rest, pad, np.int32)])
        flags = np.concatenate([flags, np.zeros(width - rest, np.bool_)])
    rows = ids.reshape(-1, width)
    in_loss = flags.reshape(-1, width)[:, 1:]
    keep = in_loss.any(axis=1)
    if not keep.any():
        raise DataError("no sequence has a token in the loss (every completion is empty or "
                        "every chat lacks an assistant turn); check the data's fields")
    return np.ascontiguousarray(rows[keep]), np.ascontiguousarray(in_loss[keep])
