"""The pipeline Gantt chart: ranks as rows, one box per action, idle time left empty.

The figure from the GPipe and Megatron-LM papers: rank 0 at the top, time to the right,
forward boxes light, backward boxes darker, input-grad (I) and weight-grad (W) in their own
colours, the micro-batch number inside each box that is wide enough for it. With virtual
stages (v chunks per rank) each chunk gets its own shade of the op's colour: chunk 0 full,
later chunks paler. The title names the schedule, its sizes, and both bubble figures.

All boxes are one collection holding one compound path per colour, so even p=64, m=512, v=4
(262,144 boxes) draws in about two seconds; labels that would not fit their box are not drawn.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stagewise.schedules.ir import Op
from stagewise.sim.timeline import Event, Timeline
from stagewise.viz._common import (
    OP_COLOURS,
    OP_NAMES,
    chunk_numbers,
    describe,
    display_time,
    image_path,
    new_figure,
    save_figure,
    shade,
    text_colour,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["compare_timelines", "plot_timeline"]

DPI = 100.0
BOX_HEIGHT = 0.8  # share of a rank's row a box fills
LEFT, RIGHT, TOP = 0.85, 0.3, 0.75  # margins in inches
AXIS_LABELS = 0.6  # inches under the axes for tick labels and the axis label
LEGEND_ROW = 0.3  # inches per legend row
PANEL_GAP = 0.35  # extra inches between stacked panels (compare_timelines)
MIN_FONT, MAX_FONT = 5.0, 9.0  # points, box labels
DIGIT_WIDTH = 0.64  # width of a digit in em (DejaVu Sans)


@dataclass(frozen=True)
class _Size:
    """A panel's size in inches."""

    width: float
    height: float


def plot_timeline(
    timeline: Timeline, path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Draw ``timeline`` as a pipeline Gantt chart and write it to ``path`` (PNG or SVG).

    Args:
        timeline: a simulated or measured Timeline.
        path: output file; the suffix (``.png`` or ``.svg``) picks the format.
        title: first title line; default names the schedule and its sizes. The second line
            always gives both bubble figures and the makespan.

    Returns:
        ``path`` as a Path.

    Raises:
        ConfigError: the suffix is not ``.png`` or ``.svg``.

    Example:
        >>> from stagewise.schedules import build
        >>> from stagewise.sim import simulate
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "1f1b.png"
        >>> plot_timeline(simulate(build("1f1b", num_ranks=2, num_microbatches=3)), out).exists()
        True
    """
    out = image_path(path)
    panel = _panel_size(timeline)
    legend = _legend(timeline)
    bottom = _legend_height(legend)
    figure = new_figure(LEFT + panel.width + RIGHT, TOP + panel.height + bottom, DPI)
    axes = _add_axes(figure, LEFT, bottom, panel)
    _draw(axes, timeline, panel, _span(timeline))
    heading = title if title is not None else describe(timeline)
    figure.suptitle(f"{heading}\n{_figures_line(timeline)}", y=1 - 0.08 / figure.get_figheight())
    _add_legend(figure, legend)
    return save_figure(figure, out)


def compare_timelines(
    predicted: Timeline, measured: Timeline, path: str | os.PathLike[str]
) -> Path:
    """Draw ``predicted`` over ``measured`` as two Gantt charts and write them to ``path``.

    When both timelines use the same time unit they share one time axis, so a slower measured
    step shows as a longer row. Each panel's title gives its own bubble figures.

    Raises:
        ConfigError: the suffix is not ``.png`` or ``.svg``.
    """
    out = image_path(path)
    timelines = (predicted, measured)
    sizes = [_panel_size(t) for t in timelines]
    width = max(size.width for size in sizes)
    legend = _legend(predicted, measured)
    bottom = _legend_height(legend)
    heights = [size.height for size in sizes]
    total = TOP + sum(heights) + (AXIS_LABELS + TOP) + bottom
    figure = new_figure(LEFT + width + RIGHT, total, DPI)
    shared = predicted.time_unit == measured.time_unit
    span = max(_span(t) for t in timelines) if shared else None
    lower = bottom
    roles = ("measured", "predicted")  # drawn bottom up
    for role, timeline, height in zip(roles, reversed(timelines), reversed(heights), strict=True):
        panel = _Size(width, height)
        axes = _add_axes(figure, LEFT, lower, panel)
        _draw(axes, timeline, panel, span if span is not None else _span(timeline))
        axes.set_title(
            f"{role} \u2013 {describe(timeline)}\n{_figures_line(timeline)}", fontsize=10
        )
        lower += height + AXIS_LABELS + TOP
    _add_legend(figure, legend)
    return save_figure(figure, out)


# --- layout ----------------------------------------------------------------------------------


def _span(timeline: Timeline) -> float:
    """Length of the time axis, in display units."""
    factor, _ = display_time(timeline)
    return timeline.makespan * factor or 1.0


def _panel_size(timeline: Timeline) -> _Size:
    """Axes size: about 22 px per shortest action across the step, clamped to 7..22 in wide."""
    durations = sorted(e.duration for e in timeline.events if e.duration > 0)
    shortest = durations[len(durations) // 10] if durations else 1.0
    slots = timeline.makespan / shortest if timeline.makespan else 1.0
    width = min(max(slots * 22 / DPI, 7.0), 22.0)
    height = min(max(0.42 * timeline.num_ranks, 1.6), 12.0)
    return _Size(width, height)


def _add_axes(figure: Figure, left: float, bottom: float, panel: _Size) -> Axes:
    width, height = figure.get_figwidth(), figure.get_figheight()
    return figure.add_axes(
        (left / width, bottom / height, panel.width / width, panel.height / height)
    )


def _figures_line(timeline: Timeline) -> str:
    bubble = timeline.bubble()
    factor, label = display_time(timeline)
    unit = label.removeprefix("time (").removesuffix(")")
    return (
        f"bubble {bubble.of_step:.1%} of step, {bubble.vs_ideal:.1%} vs ideal compute; "
        f"makespan {timeline.makespan * factor:.4g} {unit}"
    )


# --- drawing ---------------------------------------------------------------------------------


def _draw(axes: Axes, timeline: Timeline, panel: _Size, span: float) -> None:
    """Boxes, labels and axes of one Gantt panel ``panel`` inches big, ``span`` units wide."""
    factor, axis_label = display_time(timeline)
    origin = timeline.start
    chunk_of = chunk_numbers(timeline)
    shades = {
        (op, chunk): shade(OP_COLOURS[op], chunk, timeline.num_chunks)
        for op in Op
        for chunk in range(max(chunk_of.values(), default=0) + 1)
    }
    events = timeline.events
    faces = [shades[(event.op, chunk_of[(event.rank, event.stage)])] for event in events]
    px_per_unit = panel.width * DPI / span
    widths = [event.duration * factor * px_per_unit for event in events]
    edge = 0.6 if min(widths, default=0.0) >= 4 else 0.0
    _add_boxes(axes, events, faces, origin, factor, edge)
    row_px = panel.height * DPI / max(timeline.num_ranks, 1) * BOX_HEIGHT
    digits = len(str(max(timeline.num_microbatches - 1, 0)))
    font = _label_font(widths, digits, row_px)
    if font is not None:
        need = _label_px(digits, font)
        for event, face, width in zip(events, faces, widths, strict=True):
            if width >= need:
                middle = ((event.start + event.end) / 2 - origin) * factor
                axes.text(
                    middle, event.rank, str(event.microbatch), ha="center", va="center",
                    fontsize=font, color=text_colour(face), gid=f"label-{event.label}",
                )  # fmt: skip
    _style_axes(axes, timeline, span, axis_label)


def _add_boxes(
    axes: Axes,
    events: Sequence[Event],
    faces: Sequence[tuple[float, float, float]],
    origin: float,
    factor: float,
    edge: float,
) -> None:
    """All boxes as one collection holding one compound path per colour (fast for 100k boxes)."""
    import numpy as np
    from matplotlib.collections import PathCollection
    from matplotlib.path import Path as MplPath

    groups: dict[tuple[float, float, float], list[Event]] = {}
    for event, face in zip(events, faces, strict=True):
        groups.setdefault(face, []).append(event)
    corner = [MplPath.MOVETO, MplPath.LINETO, MplPath.LINETO, MplPath.LINETO, MplPath.CLOSEPOLY]
    paths = []
    for members in groups.values():
        left = np.array([(e.start - origin) * factor for e in members])
        right = np.array([(e.end - origin) * factor for e in members])
        top = np.array([e.rank for e in members], dtype=float) - BOX_HEIGHT / 2
        low = top + BOX_HEIGHT
        xs = np.stack([left, right, right, left, left], axis=1)
        ys = np.stack([top, top, low, low, top], axis=1)
        vertices = np.stack([xs, ys], axis=2).reshape(-1, 2)
        paths.append(MplPath(vertices, np.tile(corner, len(members))))
    collection = PathCollection(
        paths, facecolors=list(groups), edgecolors="#333333", linewidths=edge
    )
    collection.set_gid("boxes")
    axes.add_collection(collection)


def _label_font(widths: list[float], digits: int, row_px: float) -> float | None:
    """Label size in points: the largest that still labels every box the smallest size would.

    Every box is judged by the widest micro-batch number (``digits`` digits), so boxes of one
    width are all labelled or all left blank. None when no box can hold a label.
    """
    by_height = row_px * 0.55 * 72 / DPI
    if by_height < MIN_FONT:
        return None
    most = sum(width >= _label_px(digits, MIN_FONT) for width in widths)
    if most == 0:
        return None
    font = MIN_FONT
    while font + 0.5 <= min(MAX_FONT, by_height):
        if sum(width >= _label_px(digits, font + 0.5) for width in widths) < most:
            break
        font += 0.5
    return font


def _label_px(digits: int, font: float) -> float:
    """Width in pixels a label of ``digits`` digits at ``font`` points needs, padding included."""
    return digits * DIGIT_WIDTH * font * DPI / 72 + 3


def _style_axes(axes: Axes, timeline: Timeline, span: float, axis_label: str) -> None:
    ranks = range(timeline.num_ranks)
    axes.set_xlim(0, span)
    axes.set_ylim(timeline.num_ranks - 0.5, -0.5)  # rank 0 at the top
    axes.set_yticks(list(ranks), [f"rank {r}" for r in ranks])
    axes.tick_params(axis="y", length=0)
    for boundary in range(1, timeline.num_ranks):
        axes.axhline(boundary - 0.5, color="#dddddd", linewidth=0.6, zorder=0)
    axes.set_xlabel(axis_label)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)


# --- legend ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Legend:
    """Legend swatches, ``rows`` high, filled column by column (one op's chunks together)."""

    entries: tuple[tuple[str, tuple[float, float, float]], ...]
    rows: int

    @property
    def columns(self) -> int:
        return max(1, -(-len(self.entries) // self.rows))


def _legend(*timelines: Timeline) -> _Legend:
    """A swatch per op present; per chunk shade too when that makes at most 12 swatches."""
    ops = [op for op in Op if any(e.op is op for t in timelines for e in t.events)]
    num_chunks = max(t.num_chunks for t in timelines)
    shades = num_chunks if num_chunks > 1 and len(ops) * num_chunks <= 12 else 1
    entries = tuple(
        (
            OP_NAMES[op] + (f", chunk {chunk}" if shades > 1 else ""),
            shade(OP_COLOURS[op], chunk, num_chunks),
        )
        for op in ops
        for chunk in range(shades)
    )
    if shades == 1:
        return _Legend(entries, 1 if len(entries) <= 4 else 2)
    return _Legend(entries, 2 if shades % 2 == 0 else shades)


def _legend_height(legend: _Legend) -> float:
    """Inches under the axes for tick labels, axis label and legend."""
    return AXIS_LABELS + LEGEND_ROW * (legend.rows if legend.entries else 0) + 0.15


def _add_legend(figure: Figure, legend: _Legend) -> None:
    from matplotlib.patches import Patch

    if not legend.entries:
        return
    handles = [
        Patch(facecolor=colour, edgecolor="#333333", linewidth=0.6, label=label)
        for label, colour in legend.entries
    ]
    figure.legend(
        handles=handles, loc="lower center", ncol=legend.columns, frameon=False,
        fontsize=9, bbox_to_anchor=(0.5, 0.1 / figure.get_figheight()),
    )  # fmt: skip
