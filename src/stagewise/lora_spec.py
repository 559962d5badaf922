"""What LoRA fine-tuning adds to a model: ``--lora r=16,alpha=32,dropout=0.05,targets=...``.

:class:`LoraSpec` is plain data (no torch), so run configs and the command line can hold and
check it; ``stagewise.runtime.models.lora`` applies it to a model through ``peft``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from stagewise.errors import ConfigError

__all__ = ["LoraSpec"]

_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_KEYS = ("r", "alpha", "dropout", "targets")
_EXAMPLE = "r=16,alpha=32,dropout=0.05,targets=q_proj,k_proj,v_proj,o_proj"


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters: ``W x + (alpha / r) * B A dropout(x)`` on every target Linear.

    Attributes:
        r: the adapters' rank (rows of A, columns of B), >= 1.
        alpha: the scale's numerator; the adapter output is multiplied by ``alpha / r``.
        dropout: dropout on the adapters' input, in ``[0, 1)``.
        targets: names of the Linear modules that get adapters (the last part of the module's
            name: ``q_proj`` adapts every layer's ``self_attn.q_proj``).

    Raises:
        ConfigError: a value out of range, no targets, a target that is not a module name.

    Example:
        >>> LoraSpec.parse("r=4,targets=q_proj,k_proj")
        LoraSpec(r=4, alpha=16.0, dropout=0.0, targets=('q_proj', 'k_proj'))
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=("q_proj", "v_proj"))

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA r must be an integer >= 1, got {self.r!r}: e.g. r=16")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be > 0, got {self.alpha!r}: e.g. alpha=32")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                f"LoRA dropout must be in [0, 1), got {self.dropout!r}: e.g. dropout=0.05"
            )
        if not self.targets:
            raise ConfigError(f"LoRA needs at least one target module: e.g. {_EXAMPLE}")
        bad = [name for name in self.targets if not _NAME.match(name)]
        if bad:
            raise ConfigError(
                f"LoRA target {bad[0]!r} is not a module name: give the last part of the Linear "
                f"modules' names, comma separated (targets=q_proj,v_proj)"
            )
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"LoRA targets {','.join(self.targets)} name a module twice")

    @property
    def scale(self) -> float:
        """``alpha / r``: what the adapters' output is multiplied by."""
        return self.alpha / self.r

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """The spec of ``--lora`` text: ``key=value`` items, comma separated, ``targets`` last
        (its names comma separated too); keys left out keep their defaults.

        Raises:
            ConfigError: an unknown or repeated key, a value that is not a number, an item
                without ``=`` before ``targets``, or a value out of range.

        Example:
            >>> LoraSpec.parse("r=16,alpha=32,dropout=0.05,targets=q_proj,v_proj").scale
            2.0
        """
        values: dict[str, Any] = {}
        targets: list[str] | None = None
        for item in (part.strip() for part in text.split(",")):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep:
                if targets is None or not item:
                    raise ConfigError(
                        f"--lora {text!r}: {item!r} is not key=value; write {_EXAMPLE} "
                        f"(keys {', '.join(_KEYS)}; targets last)"
                    )
                targets.append(item)
                continue
            if key not in _KEYS or key in values or (key == "targets" and targets is not None):
                what = "repeated" if key in values or key == "targets" else "unknown"
                raise ConfigError(
                    f"--lora {text!r}: {what} key {key!r}; the keys are {', '.join(_KEYS)}, "
                    f"each once, targets last: e.g. {_EXAMPLE}"
                )
            if targets is not None:
                raise ConfigError(f"--lora {text!r}: put targets last: e.g. {_EXAMPLE}")
            if key == "targets":
                targets = [value] if value else []
            else:
                values[key] = _number(text, key, value)
        if targets is not None:
            values["targets"] = tuple(targets)
        return cls(**values)

    def to_text(self) -> str:
        """The ``--lora`` text of this spec (``parse`` reads it back).

        Example:
            >>> LoraSpec(r=4).to_text()
            'r=4,alpha=16,dropout=0,targets=q_proj,v_proj'
        """
        return (f"r={self.r},alpha={self.alpha:g},dropout={self.dropout:g},"
                f"targets={','.join(self.targets)}")

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready fields (``from_dict`` reads them back)."""
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> LoraSpec:
        """The spec of :meth:`to_dict`'s fields.

        Raises:
            ConfigError: unknown fields, or values as :class:`LoraSpec` refuses them.
        """
        unknown = sorted(set(fields) - set(_KEYS))
        if unknown:
            raise ConfigError(f"LoRA spec has unknown fields {', '.join(unknown)}: keys are "
                              f"{', '.join(_KEYS)}")
        values = dict(fields)
        if "targets" in values:
            values["targets"] = tuple(values["targets"])
        if "alpha" in values:
            values["alpha"] = float(values["alpha"])
        if "dropout" in values:
            values["dropout"] = float(values["dropout"])
        return cls(**values)


def _number(text: str, key: str, value: str) -> int | float:
    try:
        return int(value) if key == "r" else float(value)
    except ValueError:
        kind = "an integer" if key == "r" else "a number"
        raise ConfigError(
            f"--lora {text!r}: {key}={value!r} is not {kind}: e.g. {_EXAMPLE}"
        ) from None
