"""Schedule search: list scheduling plus local search, timed by the simulator.

This package sits above ``stagewise.schedules`` and ``stagewise.sim`` (it builds schedules and
times them); neither of those imports it. Importing it registers the ``auto`` schedule, so
``stagewise.schedules.build("auto", ...)`` works after ``import stagewise``.

Pure Python; importing this package does not import torch.
"""

from stagewise.search.auto import auto
from stagewise.search.bounds import fill_bound, lower_bound
from stagewise.search.schedule_search import ScheduleSearchResult, search_schedule

__all__ = ["ScheduleSearchResult", "auto", "fill_bound", "lower_bound", "search_schedule"]
