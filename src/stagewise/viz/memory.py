"""Live activation memory over time, per rank, with each rank's peak marked.

Up to :data:`MAX_PANELS` ranks get one small panel each (shared axes, so ranks compare at a
glance: rank 0 of 1F1B holds p micro-batches, the last rank one); more ranks share one panel
with a line each. Levels are stage-micro-batches (a chunk of a rank with v chunks counts 1/v)
or MiB when ``in_bytes``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from stagewise.errors import ConfigError
from stagewise.sim.timeline import Timeline
from stagewise.viz._common import (
    collapse_steps,
    describe,
    display_time,
    image_path,
    new_figure,
    save_figure,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_memory"]

MAX_PANELS = 12
MIB = 2.0**20
LINE = "#0072B2"  # Okabe-Ito blue
PEAK = "#D55E00"  # Okabe-Ito vermillion


def plot_memory(timeline: Timeline, path: str | os.PathLike[str], in_bytes: bool = False) -> Path:
    """Plot each rank's live activations over the step and write the figure to ``path``.

    Args:
        timeline: a simulated or measured Timeline.
        path: output file, ``.png`` or ``.svg``.
        in_bytes: plot MiB (needs ``timeline.activation_bytes``) instead of
            stage-micro-batches.

    Returns:
        ``path`` as a Path.

    Raises:
        ConfigError: unknown suffix, or ``in_bytes`` without activation sizes.

    Example:
        >>> from stagewise.schedules import build
        >>> from stagewise.sim import simulate
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "memory.png"
        >>> plot_memory(simulate(build("gpipe", num_ranks=2, num_microbatches=2)), out).exists()
        True
    """
    out = image_path(path)
    if in_bytes and timeline.activation_bytes is None:
        raise ConfigError(
            f"timeline of {timeline.schedule_name!r} has no activation sizes, so in_bytes=True "
            "cannot be drawn: simulate with Costs(activation_bytes=...) or pass in_bytes=False"
        )
    factor, time_label = display_time(timeline)
    scale, unit = (1 / MIB, "MiB") if in_bytes else (1.0, "stage-micro-batches")
    series = [_steps(timeline, rank, in_bytes, factor, scale) for rank in range(timeline.num_ranks)]
    panels = timeline.num_ranks <= MAX_PANELS
    height = 0.75 * timeline.num_ranks + 1.3 if panels else 5.0
    figure = new_figure(9.0, height)
    figure.set_layout_engine("constrained")
    if panels:
        grid = figure.subplots(timeline.num_ranks, 1, sharex=True, sharey=True, squeeze=False)
        for rank, axes in enumerate(grid[:, 0]):
            _draw_rank(axes, series[rank], LINE, unit, fill=True)
            axes.set_ylabel(f"rank {rank}", rotation=0, ha="right", va="center")
        last = grid[-1, 0]
    else:
        last = figure.subplots()
        colours = _rank_colours(timeline.num_ranks)
        for rank, steps in enumerate(series):
            _draw_rank(last, steps, colours[rank], unit, fill=False, label=f"rank {rank}")
        last.legend(fontsize=7, ncol=max(1, timeline.num_ranks // 16), loc="upper right")
        last.set_ylabel(f"live activations ({unit})")
    last.set_xlabel(time_label)
    last.set_xlim(0, timeline.makespan * factor or 1.0)
    highest = max(level for steps in series for _, level in steps)
    last.set_ylim(0, highest * 1.3 or 1.0)
    if panels:
        figure.supylabel(f"live activations ({unit})", fontsize=10)
    figure.suptitle(f"live activations per rank: {describe(timeline)}", fontsize=11)
    return save_figure(figure, out)


def _steps(
    timeline: Timeline, rank: int, in_bytes: bool, factor: float, scale: float
) -> list[tuple[float, float]]:
    """(time, level) steps of ``rank`` in display units, ending at the makespan."""
    origin = timeline.start
    steps = [
        ((time - origin) * factor, level * scale)
        for time, level in collapse_steps(timeline.live_activations(rank, in_bytes=in_bytes))
    ]
    steps.append((timeline.makespan * factor, steps[-1][1]))
    return steps


def _draw_rank(
    axes: Axes,
    steps: list[tuple[float, float]],
    colour: str | tuple[float, ...],
    unit: str,
    fill: bool,
    label: str | None = None,
) -> None:
    times = [time for time, _ in steps]
    levels = [level for _, level in steps]
    axes.step(times, levels, where="post", color=colour, linewidth=1.4, label=label)
    if fill:
        axes.fill_between(times, levels, step="post", color=colour, alpha=0.2, linewidth=0)
    peak = max(levels)
    at = times[levels.index(peak)]
    axes.plot([at], [peak], marker="v", color=PEAK, markersize=6, linestyle="none")
    if fill:
        text = f"peak {peak:.4g}" + (" MiB" if unit == "MiB" else "")
        axes.annotate(
            text, (at, peak), xytext=(6, -2), textcoords="offset points", va="top",
            fontsize=8, color=PEAK,
        )  # fmt: skip
    axes.grid(axis="y", color="#e5e5e5", linewidth=0.6)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)


def _rank_colours(num_ranks: int) -> list[tuple[float, ...]]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [tuple(cmap(rank / max(num_ranks - 1, 1))) for rank in range(num_ranks)]
