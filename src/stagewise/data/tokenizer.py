"""A model folder's tokenizer: loading it (local files only), its fingerprint for the cache,
and the special tokens the packer puts around each document."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stagewise.data.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Specials", "load_tokenizer", "specials_of", "tokenizer_fingerprint"]

# The files a Hugging Face tokenizer is saved as (any of them makes a folder a tokenizer folder).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json",
)


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in a local model folder (``transformers.AutoTokenizer``).

    Nothing is downloaded: the folder must exist and hold the tokenizer's files (as written by
    ``tokenizer.save_pretrained``).

    Args:
        model_dir: the model folder (or a folder holding only a tokenizer).

    Returns:
        The tokenizer (a fast one where the folder has ``tokenizer.json``).

    Raises:
        DataError: the folder does not exist, has no tokenizer files, or they do not load.

    Example::

        tokenizer = load_tokenizer("./my-llama")
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise DataError(
            f"tokenizer folder {folder} does not exist; pass a local model folder (fetch a "
            f"Hub model first: `hf download {model_dir} --local-dir ./{folder.name}`)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(
            f"{folder} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); "
            f"save the model's tokenizer there with tokenizer.save_pretrained('{folder}')")
    from transformers import AutoTokenizer

    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        reason = " ".join(str(err).split())
        raise DataError(f"cannot load the tokenizer in {folder}: {reason}") from err
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash that changes whenever the tokenizer would tokenise differently.

    It covers the content of the tokenizer's files in its folder (or, for a tokenizer not
    loaded from a folder, its serialised form), its chat template and its special tokens.
    """
    digest = hashlib.sha256()
    folder = Path(str(tokenizer.name_or_path))
    files = sorted(p for p in folder.glob("*") if p.name in TOKENIZER_FILES) if (
        folder.is_dir()) else []
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    if not files and tokenizer.is_fast:
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(type(tokenizer).__name__.encode())
    digest.update(str(tokenizer.chat_template).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Specials:
    """The token ids the packer puts around each document.

    ``prefix`` and ``suffix`` are what the tokenizer itself adds to a text (for Llama a BOS
    before; for GPT-2 nothing); ``eos`` ends every document; ``pad`` fills the last sequence.
    """

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    eos: int
    pad: int


def specials_of(tokenizer: PreTrainedTokenizerBase) -> Specials:
    """Find the special tokens ``tokenizer`` adds around a text, and its EOS and pad ids.

    Raises:
        DataError: the tokenizer defines no EOS token (documents could not be separated).
    """
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise DataError(
            f"the tokenizer in {tokenizer.name_or_path} defines no eos_token, which separates "
            "documents; set \"eos_token\" in its tokenizer_config.json")
    pad = tokenizer.pad_token_id
    plain = list(tokenizer("a b", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a b", add_special_tokens=True)["input_ids"])
    prefix: list[int] = full
    suffix: list[int] = []
    for start in range(len(full) - len(plain) + 1):
        if plain and full[start:start + len(plain)] == plain:
            prefix, suffix = full[:start], full[start + len(plain):]
            break
    return Specials(tuple(prefix), tuple(suffix), eos, pad if isinstance(pad, int) else eos)
