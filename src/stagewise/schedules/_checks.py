"""Argument checks shared by the schedule generators."""

from __future__ import annotations

from stagewise.errors import ScheduleError


def require_positive(schedule: str, **sizes: int) -> None:
    """Raise ScheduleError naming the first size that is not a positive integer."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScheduleError(
                f"{schedule}: {name} must be a positive integer, got {value!r}: "
                f"pass {name} >= 1"
            )
