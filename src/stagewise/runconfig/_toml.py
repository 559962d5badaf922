"""Writing and checking TOML values for run configurations (no third-party TOML writer)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from stagewise.errors import ConfigError

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _positive(section: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"[{section}] {name} must be a positive integer, got {value!r}: write {name} = 2"
        )


def _section(lines: list[str], name: str, values: Mapping[str, Any],
             comments: Mapping[str, str] | None = None) -> None:
    lines += ["", f"[{name}]"]
    for key, value in values.items():
        note = (comments or {}).get(key)
        text = _toml(value, key)
        if isinstance(value, list | tuple) and len(value) > 1 and len(text) > 80:
            text = "[\n" + "".join(f"  {_toml(v, key)},\n" for v in value) + "]"
        lines.append(f"{_key(key)} = {text}" + (f"  # {note}" if note else ""))


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(text: str) -> str:
    """A TOML basic string: JSON's escapes, which TOML shares, plus DEL (JSON leaves it)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml(value: Any, key: str) -> str:
    """One TOML value: string, integer, float, boolean, array or inline table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)  # repr: shortest exact, "inf" ok
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v, key) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_key(k)} = {_toml(v, k)}" for k, v in value.items())
        return "{" + inner + "}"
    raise ConfigError(f"{key} = {value!r}: TOML cannot hold a {type(value).__name__}")


def _check_toml_values(where: str, values: Mapping[str, Any]) -> None:
    """Raise ConfigError for a value TOML cannot write (None, objects) or a non-string key."""
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"[{where}] keys must be strings, got {key!r}")
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            if isinstance(item, Mapping):
                _check_toml_values(f"{where}.{key}", item)
            elif item is None:
                raise ConfigError(
                    f"[{where}] {key} is None, which TOML cannot hold: leave the key out"
                )
            elif not isinstance(item, str | int | float | bool | list | tuple):
                raise ConfigError(
                    f"[{where}] {key} = {item!r}: a {type(item).__name__} cannot be written "
                    "as TOML; use a string, number, boolean, list or table"
                )


_TYPE_NAMES = {bool: "a boolean (true or false)", int: "an integer", float: "a number",
               str: "a string", tuple: "a list", list: "a list", dict: "a table"}


def _check_type(section: str, name: str, value: object, kind: type) -> None:
    """Raise ConfigError unless ``value`` is a ``kind`` (an integer counts as a float)."""
    if kind in (list, tuple):
        kind = list | tuple  # type: ignore[assignment]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ConfigError(
            f"[{section}] {name} must be {_TYPE_NAMES.get(kind, 'a list')}, got "
            f"{value!r} ({type(value).__name__}): {_example(name, kind)}"
        )


def _example(name: str, kind: type) -> str:
    if kind is dict:
        return f"write it as a [section.{name}] table"
    sample = {int: "2", float: "0.5", str: '"text"', bool: "true"}.get(kind, '["a", "b"]')
    return f"write {name} = {sample}"


