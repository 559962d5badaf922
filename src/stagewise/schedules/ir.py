"""The schedule IR: ``Op``, ``Action`` and ``Schedule``, their text form and their CSV form.

A schedule is data. ``Action(stage=2, op=Op.F, microbatch=0)`` reads ``2F0``, the spelling
torch.distributed.pipelining uses, so schedules move between the two projects. A ``Schedule``
holds, for each rank, the ordered tuple of its compute actions; communication is implied by the
placement (which rank holds each stage) and added by whoever executes the schedule.

Notation used in docstrings: p ranks, m micro-batches, v chunks per rank (each chunk one
virtual stage).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from stagewise.errors import ScheduleError

__all__ = ["Action", "Op", "Schedule", "parse_action"]


class Op(StrEnum):
    """What an action computes: forward, full backward, input-grad backward, weight-grad."""

    F = "F"
    B = "B"
    I = "I"  # noqa: E741 - the name the zero-bubble paper and torch use
    W = "W"

    def __str__(self) -> str:
        return self.value

    @property
    def is_backward(self) -> bool:
        """True for B and I, the ops that send a gradient to the previous stage."""
        return self in (Op.B, Op.I)


_ACTION_RE = re.compile(r"^\s*(\d+)\s*([FBIW])\s*(\d+)\s*$")


class Action(NamedTuple):
    """One compute step: ``op`` on ``microbatch`` through ``stage``.

    Immutable and ordered by (stage, op, microbatch); a named tuple because schedules for large
    pipelines hold hundreds of thousands of actions.
    """

    stage: int
    op: Op
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.op.value}{self.microbatch}"

    def __repr__(self) -> str:
        return f"Action({self})"


def parse_action(text: str) -> Action:
    """Parse the text form ``"2F0"`` (stage, op, micro-batch) into an :class:`Action`.

    Raises:
        ScheduleError: the text is not ``<stage><F|B|I|W><microbatch>``.

    Example:
        >>> parse_action("2F0")
        Action(2F0)
    """
    found = _ACTION_RE.match(text)
    if found is None:
        raise ScheduleError(
            f"cannot read action {text!r}: write <stage><op><microbatch> with op one of "
            "F, B, I, W, for example '2F0' or '0B3'"
        )
    return Action(int(found.group(1)), Op(found.group(2)), int(found.group(3)))


@dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: which rank runs which action, in which order.

    Attributes:
        name: a label (the generator's registry name, or the file it came from).
        num_ranks: p, the number of pipeline ranks.
        num_stages: the number of (virtual) stages, p x v for v chunks per rank.
        num_microbatches: m.
        placement: ``placement[stage]`` is the rank that holds ``stage``.
        actions: ``actions[rank]`` is that rank's ordered tuple of compute actions.

    Construction checks only the shape (sizes, placement range); :func:`stagewise.schedules.check`
    checks that the schedule can actually run.
    """

    name: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    placement: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]
    _stages_of: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    # Results derived once from the immutable rows (the validator's execution order).
    _derived: dict[str, object] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        if self.num_ranks < 1 or self.num_stages < 1 or self.num_microbatches < 1:
            raise ScheduleError(
                f"schedule {self.name!r} needs at least one rank, stage and micro-batch; got "
                f"ranks={self.num_ranks}, stages={self.num_stages}, "
                f"microbatches={self.num_microbatches}"
            )
        if len(self.placement) != self.num_stages:
            raise ScheduleError(
                f"placement lists {len(self.placement)} stages but the schedule has "
                f"{self.num_stages}: give one rank per stage"
            )
        bad = [s for s, r in enumerate(self.placement) if not 0 <= r < self.num_ranks]
        if bad:
            raise ScheduleError(
                f"stage {bad[0]} is placed on rank {self.placement[bad[0]]}, outside 0.."
                f"{self.num_ranks - 1}: place every stage on an existing rank"
            )
        if len(self.actions) != self.num_ranks:
            raise ScheduleError(
                f"schedule has {len(self.actions)} rows of actions for {self.num_ranks} ranks: "
                "give exactly one row per rank"
            )
        stages_of: list[list[int]] = [[] for _ in range(self.num_ranks)]
        for stage, rank in enumerate(self.placement):
            stages_of[rank].append(stage)
        object.__setattr__(self, "_stages_of", tuple(tuple(s) for s in stages_of))

    # --- placement ------------------------------------------------------------------------

    @property
    def num_chunks(self) -> int:
        """v: the most stages any rank holds (1 unless the schedule uses virtual stages)."""
        return max(len(stages) for stages in self._stages_of)

    def rank_of(self, stage: int) -> int:
        """The rank that holds ``stage``."""
        return self.placement[stage]

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages ``rank`` holds, in increasing order."""
        return self._stages_of[rank]

    @property
    def num_actions(self) -> int:
        """Total number of compute actions over all ranks."""
        return sum(len(row) for row in self.actions)

    @property
    def splits_backward(self) -> bool:
        """True when the schedule uses I/W (split backward) anywhere."""
        return any(a.op in (Op.I, Op.W) for row in self.actions for a in row)

    # --- text forms -----------------------------------------------------------------------

    def table(self) -> str:
        """The per-rank action grid, one line per rank, columns aligned."""
        cells = [[str(a) for a in row] for row in self.actions]
        width = max([len(c) for row in cells for c in row] + [2])
        lines = []
        for rank, row in enumerate(cells):
            lines.append(f"rank {rank:>2}: " + " ".join(c.rjust(width) for c in row))
        return "\n".join(lines)

    def to_csv(self) -> str:
        """One row per rank, one action per cell (torch.distributed.pipelining's layout)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        for row in self.actions:
            writer.writerow([str(a) for a in row])
        return out.getvalue()

    def save_csv(self, path: str | Path) -> None:
        """Write :meth:`to_csv` to ``path``."""
        Path(path).write_text(self.to_csv())

    @classmethod
    def from_csv(cls, text: str, name: str = "csv") -> Schedule:
        """Read a schedule from CSV text: one row per rank, one action per cell.

        Empty cells (torch writes them for idle steps) are skipped. The number of ranks is the
        number of rows; stages and micro-batches are read from the actions; each stage's rank is
        the row its actions appear in.

        Raises:
            ScheduleError: a cell is not an action, a stage appears on two ranks, or a stage
                number is missing altogether.
        """
        rows: list[tuple[Action, ...]] = []
        for line_no, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            parsed = []
            for cell in row:
                if not cell.strip() or cell.strip() == "None":
                    continue
                try:
                    parsed.append(parse_action(cell))
                except ScheduleError as err:
                    raise ScheduleError(f"{name}, line {line_no}: {err}") from None
            rows.append(tuple(parsed))
        while rows and not rows[-1]:
            rows.pop()
        if not rows:
            raise ScheduleError(f"{name} holds no actions: write one row of actions per rank")
        return cls.from_rows(rows, name=name)

    @classmethod
    def load_csv(cls, path: str | Path) -> Schedule:
        """Read a schedule from a CSV file (see :meth:`from_csv`)."""
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as err:
            raise ScheduleError(
                f"cannot read schedule file {str(file)!r}: {err.strerror}"
            ) from None
        except UnicodeDecodeError as err:
            raise ScheduleError(
                f"schedule file {str(file)!r} is not UTF-8 text (byte {err.start}): write it "
                "as a CSV of actions such as 2F0, one row per rank"
            ) from None
        return cls.from_csv(text, name=file.name)

    @classmethod
    def from_rows(cls, rows: list[tuple[Action, ...]], name: str = "custom") -> Schedule:
        """Build a schedule from per-rank action rows, inferring placement and sizes."""
        owner: dict[int, int] = {}
        for rank, row in enumerate(rows):
            for action in row:
                previous = owner.setdefault(action.stage, rank)
                if previous != rank:
                    raise ScheduleError(
                        f"{name}: stage {action.stage} has actions on rank {previous} and on "
                        f"rank {rank} ({action}): each stage must live on exactly one rank"
                    )
        if not owner:
            raise ScheduleError(f"{name} holds no actions: write one row of actions per rank")
        num_stages = max(owner) + 1
        missing = [s for s in range(num_stages) if s not in owner]
        if missing:
            raise ScheduleError(
                f"{name}: stage {missing[0]} has no actions although stage {num_stages - 1} "
                "does: stages are numbered 0..S-1 with none left out"
            )
        num_microbatches = 1 + max(a.microbatch for row in rows for a in row)
        return cls(
            name=name,
            num_ranks=len(rows),
            num_stages=num_stages,
            num_microbatches=num_microbatches,
            placement=tuple(owner[s] for s in range(num_stages)),
            actions=tuple(tuple(row) for row in rows),
        )
