"""How large a schedule the simulator takes: a limit on its number of actions.

Building, validating and simulating a schedule costs time in proportion to its actions,
p x v x m x (2 or 3) for p ranks, v chunks per rank, m micro-batches and F/B or F/I/W. The
command line refuses a schedule over :data:`MAX_ACTIONS` *before* building it, naming the
limit and what to do, instead of running for minutes.
"""

from __future__ import annotations

from stagewise.errors import ConfigError

__all__ = ["MAX_ACTIONS", "require_simulable"]

MAX_ACTIONS = 1_000_000  # about a second or two of building, validating and simulating


def require_simulable(num_actions: int, what: str, limit: int = MAX_ACTIONS) -> None:
    """Raise :class:`ConfigError` when ``num_actions`` is over ``limit``.

    Args:
        num_actions: the schedule's actions (or the most it can have), e.g. from
            :meth:`stagewise.schedules.Generator.num_actions`.
        what: names the schedule and its sizes in the message, e.g. ``"1f1b, p=4, m=10^6"``.
        limit: the most actions allowed.

    Example:
        >>> require_simulable(10**7, "gpipe with p=4, m=1250000")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        stagewise.errors.ConfigError: gpipe with p=4, m=1250000 has 10,000,000 actions, over ...
    """
    if num_actions > limit:
        raise ConfigError(
            f"{what} has {num_actions:,} actions, over the simulator's limit of {limit:,} per "
            f"schedule: use fewer ranks p or micro-batches m (p x v x m x ops <= {limit:,}), "
            "or the closed forms (stagewise bubble) for gpipe, 1f1b and interleaved-1f1b"
        )
