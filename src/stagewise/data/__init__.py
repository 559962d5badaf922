"""Your data for ``stagewise train``: read, tokenised with the model's tokenizer, packed,
cached, and served as the global batch of each step. Importing this package imports torch.

Formats (a folder means every supported file under it, sorted by path):

- ``.txt``: the whole file is one document.
- ``.jsonl`` / ``.json``: one JSON object per line (a ``.json`` file may instead hold one
  array of objects). Each object is one document, by the first of these fields it has:
  ``messages`` (a chat: a list of ``{"role", "content"}``, rendered with the tokenizer's chat
  template; only the assistant turns are in the loss), ``prompt`` + ``completion`` (the text is
  ``prompt + completion``; only the completion is in the loss), ``text`` (all in the loss).
- ``.parquet`` / ``.arrow``: read with ``datasets.load_dataset`` (local files only); each row
  is a record with the same field rules.

Each document gets the special tokens its tokenizer adds to a text (a BOS for Llama, none for
GPT-2; a chat template writes its own) and ends with EOS. The documents are joined into one
stream and cut into sequences of ``seq_len + 1`` tokens: inputs ``seq[:-1]``, targets
``seq[1:]``, and target ``-100`` where a token is not in the loss (a prompt, a user turn, a
BOS, the padding of the last sequence). A sequence with no target in the loss is dropped.

Attention crosses document boundaries inside a packed sequence: the pipeline sends one
activation tensor between stages, so per-document attention masks are not carried. A document
sees the end of the previous one before its EOS; the EOS tells the model that a new document
begins, as in GPT-style pretraining. Use a ``seq_len`` near your documents' length, or one
document per sequence, if that matters for your task.

The packed data is cached in ``$XDG_CACHE_HOME/stagewise`` (or ``~/.cache/stagewise``), keyed
by each file's path, size and modification time, the tokenizer's files, ``seq_len`` and the
format version: a second run does not tokenise again.

Example::

    from stagewise.data import load_packed, load_tokenizer

    tokenizer = load_tokenizer("./my-llama")
    data = load_packed(["train.jsonl"], tokenizer, seq_len=512, seed=0, progress=True)
    inputs, targets = data.batch(step=0, rows=8)
"""

from stagewise.data.cache import default_cache_dir
from stagewise.data.errors import DataError
from stagewise.data.files import SUFFIXES
from stagewise.data.packed import IGNORE_INDEX, PackedData, load_packed
from stagewise.data.tokenizer import load_tokenizer

__all__ = ["IGNORE_INDEX", "SUFFIXES", "DataError", "PackedData", "default_cache_dir",
           "load_packed", "load_tokenizer"]
