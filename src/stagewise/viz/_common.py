"""What the pictures share: file formats, colours, time scaling, chunk numbers, figure set-up.

matplotlib is imported inside functions only, so ``import stagewise.viz`` stays cheap. Figures
are made with ``matplotlib.figure.Figure`` on an Agg canvas, never through pyplot: no global
figure registry, no display needed, and the caller's own matplotlib backend is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from stagewise.errors import ConfigError
from stagewise.schedules.ir import Op
from stagewise.sim.timeline import Timeline

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "OP_COLOURS",
    "OP_NAMES",
    "SUPPORTED_SUFFIXES",
    "chunk_numbers",
    "collapse_steps",
    "describe",
    "display_time",
    "image_path",
    "new_figure",
    "save_figure",
    "shade",
    "text_colour",
]

SUPPORTED_SUFFIXES = (".png", ".svg")

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies): forward
# light sky blue, backward darker bluish green, input-grad orange, weight-grad reddish purple.
OP_COLOURS = {Op.F: "#56B4E9", Op.B: "#009E73", Op.I: "#E69F00", Op.W: "#CC79A7"}
OP_NAMES = {
    Op.F: "F forward",
    Op.B: "B backward",
    Op.I: "I input-grad backward",
    Op.W: "W weight-grad backward",
}


def image_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path after checking its suffix names a format we write.

    Raises:
        ConfigError: the suffix is not one of :data:`SUPPORTED_SUFFIXES`.
    """
    result = Path(path)
    if result.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ConfigError(
            f"cannot write a picture to {str(result)!r}: unknown suffix {result.suffix!r}; "
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    return result


def display_time(timeline: Timeline) -> tuple[float, str]:
    """Factor turning the timeline's times (relative to its start) into axis units, and its label.

    Cost units stay as they are; seconds become milliseconds when the step is under a second.
    """
    if timeline.time_unit == "s":
        if timeline.makespan < 1.0:
            return 1e3, "time (ms)"
        return 1.0, "time (s)"
    return 1.0, f"time ({timeline.time_unit} units)"


def describe(timeline: Timeline) -> str:
    """``"1f1b: 4 ranks, 8 micro-batches (simulated)"``: the schedule, its sizes, the source."""
    sizes = [
        _count(timeline.num_ranks, "rank", "ranks"),
        _count(timeline.num_microbatches, "micro-batch", "micro-batches"),
    ]
    if timeline.num_chunks > 1:
        sizes.append(f"{timeline.num_chunks} chunks per rank")
    return f"{timeline.schedule_name}: {', '.join(sizes)} ({timeline.source})"


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def chunk_numbers(timeline: Timeline) -> dict[tuple[int, int], int]:
    """The chunk of each (rank, stage): its position among the stages the rank holds.

    Works for any placement: looped (stage = chunk * p + rank) and V-shaped alike.
    """
    stages: dict[int, set[int]] = {}
    for event in timeline.events:
        stages.setdefault(event.rank, set()).add(event.stage)
    return {
        (rank, stage): chunk
        for rank, held in stages.items()
        for chunk, stage in enumerate(sorted(held))
    }


def collapse_steps(steps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(time, level) steps with one entry per time: the level after every change at that time.

    A backward that frees at the instant a forward allocates is a momentary dip, not a level
    anyone sees; pictures and counters show only where the level settles.
    """
    collapsed: list[tuple[float, float]] = []
    for time, level in steps:
        if collapsed and collapsed[-1][0] == time:
            collapsed[-1] = (time, level)
        else:
            collapsed.append((time, level))
    return collapsed


def _rgb(colour: str) -> tuple[float, float, float]:
    value = colour.lstrip("#")
    red, green, blue = (int(value[i : i + 2], 16) / 255 for i in (0, 2, 4))
    return red, green, blue


def shade(colour: str, chunk: int, num_chunks: int) -> tuple[float, float, float]:
    """``colour`` for ``chunk`` of ``num_chunks``: chunk 0 full, later chunks paler."""
    red, green, blue = _rgb(colour)
    mix = 0.0 if num_chunks <= 1 else 0.6 * chunk / (num_chunks - 1)
    return (red + (1 - red) * mix, green + (1 - green) * mix, blue + (1 - blue) * mix)


def text_colour(face: tuple[float, float, float]) -> str:
    """Black or white, whichever reads better on ``face``."""
    red, green, blue = face
    luminance = 0.299 * red + 0.587 * green + 0.114 * blue
    return "black" if luminance > 0.5 else "white"


def new_figure(width: float, height: float, dpi: float = 100.0) -> Figure:
    """A Figure of ``width`` x ``height`` inches on an Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` (format from the suffix); SVG keeps its text as text."""
    import matplotlib

    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "stagewise"}):
        figure.savefig(path, format=path.suffix.lower().lstrip("."), dpi=figure.dpi)
    return path
