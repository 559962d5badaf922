"""What a record means: a plain text, a prompt with its completion, or a chat.

Each becomes a :class:`Document`: the text to tokenise and the character spans that are in the
loss. Fields are looked for in this order (fields whose value is null count as absent):

- ``messages``: a list of ``{"role", "content"}``, rendered with the tokenizer's chat template;
  the assistant turns (as the template writes them, end-of-turn marks included) are in the loss.
- ``prompt`` + ``completion``: the text is ``prompt + completion`` (joined as they are: put
  the space or newline you want at the end of the prompt); only the completion is in the loss.
- ``text``: all of it is in the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from stagewise.data.errors import DataError
from stagewise.data.files import Record

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Document", "to_document"]

Span = tuple[int, int]


@dataclass(frozen=True)
class Document:
    """One document to tokenise.

    Attributes:
        text: the text.
        loss_spans: the ``[start, end)`` character spans in the loss; ``None``: all the text.
        add_special_tokens: whether the tokenizer's own BOS/EOS go around it (plain text and
            prompt/completion); a chat template writes its own.
    """

    text: str
    loss_spans: tuple[Span, ...] | None
    add_special_tokens: bool


def to_document(record: Record, tokenizer: PreTrainedTokenizerBase) -> Document | None:
    """The document a record holds, or ``None`` for one with nothing to learn (an empty text,
    a chat without an assistant turn).

    Raises:
        DataError: the record has none of the fields, a field has the wrong type, or chat
            messages meet a tokenizer without a chat template.
    """
    fields = {key: value for key, value in record.fields.items() if value is not None}
    if "messages" in fields:
        return _chat(record.where, fields["messages"], tokenizer)
    if "prompt" in fields or "completion" in fields:
        prompt = _string(record.where, fields, "prompt")
        completion = _string(record.where, fields, "completion")
        text = prompt + completion
        return Document(text, ((len(prompt), len(text)),), True) if completion else None
    if "text" in fields:
        text = _string(record.where, fields, "text")
        return Document(text, None, True) if text.strip() else None
    raise DataError(
        f"{record.where}: a record with no 'text' field (nor 'prompt' + 'completion', nor "
        f"'messages'); it has {sorted(record.fields) or 'no fields'}; name the field that "
        "holds the text 'text'")


def _string(where: str, fields: Mapping[str, object], name: str) -> str:
    value = fields.get(name)
    if isinstance(value, str):
        return value
    if value is None:
        other = "completion" if name == "prompt" else "prompt"
        raise DataError(f"{where}: a '{other}' without a '{name}'; a record needs both")
    raise DataError(f"{where}: '{name}' is a {type(value).__name__}; it must be a string")


def _chat(where: str, messages: object, tokenizer: PreTrainedTokenizerBase) -> Document | None:
    """Render a conversation; the text each assistant turn adds is in the loss."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise DataError(f"{where}: 'messages' must be a list of "
                        '{"role": "...", "content": "..."} objects with string values')
    if not tokenizer.chat_template:
        raise DataError(
            f"{where}: chat 'messages' need a chat template and the tokenizer in "
            f"{tokenizer.name_or_path} has none; add one (chat_template.jinja) or give the "
            "data as 'prompt' + 'completion'")
    text = _render(where, tokenizer, messages, False)
    spans: list[Span] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(where, tokenizer, messages[:index], True) if index else ""
        upto = _render(where, tokenizer, messages[:index + 1], False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError(
                f"{where}: the chat template of {tokenizer.name_or_path} does not render a "
                "conversation as the renderings of its beginnings followed by the next turn, "
                "so the assistant turns cannot be found; give the data as 'prompt' + "
                "'completion'")
        spans.append((len(before), len(upto)))
    return Document(text, tuple(spans), False) if spans else None


def _render(where: str, tokenizer: PreTrainedTokenizerBase, messages: Sequence[object],
            generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            cast(list[dict[str, str]], list(messages)), tokenize=False,
            add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError, TypeError) as err:
        reason = " ".join(str(err).split())
        raise DataError(f"{where}: the chat template refused these messages: {reason}") from err
    assert isinstance(text, str), "apply_chat_template(tokenize=False) returns a string"
    return text
