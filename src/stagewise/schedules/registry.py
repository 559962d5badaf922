"""The schedule registry: look a generator up by name and build it.

``build("1f1b", num_ranks=4, num_microbatches=8)`` returns a validated :class:`Schedule`.
Generators declare whether they take ``num_chunks`` (v) and which values of it they accept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from stagewise.errors import ScheduleError
from stagewise.schedules._gc import paused_gc
from stagewise.schedules.gpipe import gpipe
from stagewise.schedules.interleaved import interleaved_1f1b
from stagewise.schedules.ir import Schedule
from stagewise.schedules.one_f_one_b import one_f_one_b
from stagewise.schedules.validate import check

__all__ = ["Generator", "build", "get", "names"]


@dataclass(frozen=True)
class Generator:
    """A registered schedule generator.

    Attributes:
        name: the registry name (``"1f1b"``).
        make: ``make(num_ranks, num_microbatches, num_chunks) -> Schedule``.
        summary: one line for listings.
        default_chunks: v used when the caller gives none.
        fixed_chunks: when set, the only v the schedule supports (1 for gpipe and 1f1b,
            2 for V-shaped schedules).
        ops: actions per stage and micro-batch: 2 (F and B) or 3 (F, I and W); the most, for
            a schedule that splits only some of its backwards.
    """

    name: str
    make: Callable[[int, int, int], Schedule]
    summary: str
    default_chunks: int = 1
    fixed_chunks: int | None = 1
    ops: int = 2

    def num_actions(self, num_ranks: int, num_microbatches: int,
                    num_chunks: int | None = None) -> int:
        """How many actions the schedule holds for these sizes (at most), before building it.

        p x v stages, each running ``ops`` actions per micro-batch: what building, validating
        and simulating the schedule costs, known in advance.

        Example:
            >>> get("1f1b").num_actions(4, 8)
            64
        """
        v = self.fixed_chunks or (self.default_chunks if num_chunks is None else num_chunks)
        return num_ranks * v * num_microbatches * self.ops


_GENERATORS: dict[str, Generator] = {
    g.name: g
    for g in (
        Generator("gpipe", lambda p, m, v: gpipe(p, m), "all forwards, then all backwards"),
        Generator("1f1b", lambda p, m, v: one_f_one_b(p, m), "one forward, one backward"),
        Generator(
            "interleaved-1f1b",
            interleaved_1f1b,
            "1F1B over v looped chunks per rank (Megatron's virtual stages)",
            default_chunks=2,
            fixed_chunks=None,
        ),
    )
}


def register(generator: Generator) -> None:
    """Add ``generator`` to the registry (used by the modules that define more schedules)."""
    _GENERATORS[generator.name] = generator


def names() -> list[str]:
    """Names of every registered schedule, in registration order."""
    return list(_GENERATORS)


def get(name: str) -> Generator:
    """The generator called ``name``; an unknown name lists the valid ones."""
    try:
        return _GENERATORS[name]
    except KeyError:
        raise ScheduleError(
            f"unknown schedule {name!r}: choose one of {', '.join(names())}"
        ) from None


def build(
    name: str,
    *,
    num_ranks: int,
    num_microbatches: int,
    num_chunks: int | None = None,
) -> Schedule:
    """Build and validate the schedule ``name``.

    Args:
        name: a registered name, see :func:`names`.
        num_ranks: p, pipeline ranks (>= 1).
        num_microbatches: m, micro-batches per step (>= 1).
        num_chunks: v, chunks per rank; ``None`` takes the schedule's default.

    Raises:
        ScheduleError: unknown name, a size out of range, or a v the schedule does not support.

    Example:
        >>> build("1f1b", num_ranks=4, num_microbatches=8).num_stages
        4
    """
    generator = get(name)
    if num_chunks is None:
        num_chunks = generator.default_chunks
    if generator.fixed_chunks is not None and num_chunks != generator.fixed_chunks:
        raise ScheduleError(
            f"{name} runs exactly {generator.fixed_chunks} chunk(s) per rank, got v={num_chunks}: "
            f"drop -v or use interleaved-1f1b for more chunks per rank"
        )
    for label, value in (("p", num_ranks), ("m", num_microbatches), ("v", num_chunks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScheduleError(
                f"{name}: {label} must be a positive integer, got {value!r}: pass {label} >= 1"
            )
    with paused_gc():
        schedule = generator.make(num_ranks, num_microbatches, num_chunks)
        check(schedule)
    return schedule
