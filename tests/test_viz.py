"""Tests for stagewise.viz: Gantt charts, memory plots and Chrome/Perfetto traces.

Pictures are checked by what they must contain: PNG signature and size, pixels of the op
colours in the proportion of the ops' time, one SVG box and label per action, the idle gap
where the hand-worked GPipe schedule has it. Traces are checked against hand-computed times.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stagewise.errors import ConfigError
from stagewise.schedules import Op, build
from stagewise.sim import Costs, Event, Timeline, simulate
from stagewise.viz import (
    chrome_trace,
    compare_timelines,
    plot_memory,
    plot_timeline,
    write_chrome_trace,
)
from stagewise.viz._common import OP_COLOURS, shade

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SVG = "{http://www.w3.org/2000/svg}"
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2)]


def simulated(name: str, p: int, m: int, v: int = 1) -> Timeline:
    return simulate(build(name, num_ranks=p, num_microbatches=m, num_chunks=v))


def colour_pixels(path: Path, colour: str | tuple[float, float, float]) -> int:
    """Number of pixels of ``path`` (a PNG) within 1.5/255 of ``colour`` in every channel."""
    import matplotlib.image
    import numpy as np

    image = matplotlib.image.imread(path)[:, :, :3]
    rgb = shade(colour, 0, 1) if isinstance(colour, str) else colour
    close = np.all(np.abs(image - np.array(rgb)) <= 1.5 / 255, axis=2)
    return int(close.sum())


def measured_timeline() -> Timeline:
    """Two ranks, one micro-batch, in seconds on a clock that does not start at zero."""
    t0 = 100.0
    events = (
        Event(0, 0, Op.F, 0, t0, t0 + 0.0015),
        Event(1, 1, Op.F, 0, t0 + 0.0017, t0 + 0.0030),
        Event(1, 1, Op.B, 0, t0 + 0.0030, t0 + 0.0055),
        Event(0, 0, Op.B, 0, t0 + 0.0058, t0 + 0.0080),
    )
    return Timeline(events, 2, 2, 1, 1, "gpipe", source="measured", time_unit="s")


def split_backward_timeline() -> Timeline:
    """One rank, one stage, two micro-batches, backward split into I and W."""
    events = (
        Event(0, 0, Op.F, 0, 0.0, 1.0),
        Event(0, 0, Op.F, 1, 1.0, 2.0),
        Event(0, 0, Op.I, 0, 2.0, 3.0),
        Event(0, 0, Op.I, 1, 3.0, 4.0),
        Event(0, 0, Op.W, 0, 4.0, 5.0),
        Event(0, 0, Op.W, 1, 5.0, 6.0),
    )
    return Timeline(events, 1, 1, 2, 1, "hand-split")


# --- Gantt PNG -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "v"), SCHEDULES)
def test_png_is_a_sized_picture_with_forward_and_backward_boxes(
    tmp_path: Path, name: str, v: int
) -> None:
    import matplotlib.image

    out = plot_timeline(simulated(name, 4, 8, v), tmp_path / f"{name}.png")
    assert out == tmp_path / f"{name}.png"
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = matplotlib.image.imread(out).shape
    assert 250 <= height <= 1500
    assert 600 <= width <= 2500
    assert colour_pixels(out, OP_COLOURS[Op.F]) > 1000
    assert colour_pixels(out, OP_COLOURS[Op.B]) > 1000
    if v == 2:  # chunk 1 drawn in its own, paler shade
        assert colour_pixels(out, shade(OP_COLOURS[Op.F], 1, 2)) > 1000


def test_png_box_areas_follow_op_times(tmp_path: Path) -> None:
    # 1F1B with backward = 2 x forward: backward boxes cover twice the forward boxes' area
    # (labels and the legend swatches take a few pixels of each).
    out = plot_timeline(simulated("1f1b", 4, 8), tmp_path / "1f1b.png")
    ratio = colour_pixels(out, OP_COLOURS[Op.B]) / colour_pixels(out, OP_COLOURS[Op.F])
    assert ratio == pytest.approx(2.0, rel=0.2)


def test_split_backward_ops_get_their_own_colours(tmp_path: Path) -> None:
    out = plot_timeline(split_backward_timeline(), tmp_path / "split.png")
    for op in (Op.F, Op.I, Op.W):
        assert colour_pixels(out, OP_COLOURS[op]) > 500, op
    assert colour_pixels(out, OP_COLOURS[Op.B]) < 100  # only a legend would show it: none
    svg = plot_timeline(split_backward_timeline(), tmp_path / "split.svg").read_text()
    assert "I input-grad backward" in svg
    assert "W weight-grad backward" in svg


# --- Gantt SVG -------------------------------------------------------------------------------


def svg_boxes(path: Path) -> list[tuple[float, float, float]]:
    """(left, right, top) of every box in the SVG's ``boxes`` group, in SVG points.

    The boxes are drawn as one compound path per colour: one ``M ... z`` subpath per box.
    """
    group = next(g for g in ET.parse(path).getroot().iter(f"{SVG}g") if g.get("id") == "boxes")
    boxes = []
    for element in group.iter(f"{SVG}path"):
        for subpath in element.get("d", "").split("M")[1:]:
            numbers = [float(x) for x in re.findall(r"-?\d+(?:\.\d*)?", subpath)]
            xs, ys = numbers[0::2], numbers[1::2]
            boxes.append((min(xs), max(xs), min(ys)))
    return boxes


def svg_labels(text: str) -> list[str]:
    return re.findall(r'<g id="label-(\d+[FBIW]\d+)">', text)


def test_svg_has_one_box_and_one_label_per_action(tmp_path: Path) -> None:
    timeline = simulated("gpipe", 2, 3)
    out = plot_timeline(timeline, tmp_path / "gpipe.svg")
    assert len(svg_boxes(out)) == len(timeline.events) == 12
    assert sorted(svg_labels(out.read_text())) == sorted(e.label for e in timeline.events)


def test_svg_shows_the_gpipe_idle_gap_where_hand_worked_times_put_it(tmp_path: Path) -> None:
    # GPipe p=2 m=3, F=1, B=2: rank 0 forwards in [0, 3), waits while rank 1 forwards
    # [1, 4) and runs B0 [4, 6), then runs its own B0 from 6. Idle on rank 0: [3, 6).
    out = plot_timeline(simulated("gpipe", 2, 3), tmp_path / "gpipe.svg")
    boxes = svg_boxes(out)
    top_row = min(top for _, _, top in boxes)
    rank0 = sorted((left, right) for left, right, top in boxes if top == top_row)
    assert len(rank0) == 6
    unit = rank0[0][1] - rank0[0][0]  # one forward = one cost unit
    gap = rank0[3][0] - rank0[2][1]
    assert gap / unit == pytest.approx(3.0)
    assert (rank0[3][1] - rank0[3][0]) / unit == pytest.approx(2.0)


def test_svg_title_names_schedule_sizes_and_both_bubbles(tmp_path: Path) -> None:
    timeline = simulated("1f1b", 4, 8)
    text = plot_timeline(timeline, tmp_path / "t.svg").read_text()
    # p=4, m=8: (p-1)/(m+p-1) = 3/11 of the step, (p-1)/m = 3/8 vs ideal compute
    assert "1f1b: 4 ranks, 8 micro-batches" in text
    assert f"bubble {3 / 11:.1%} of step, {3 / 8:.1%} vs ideal compute" in text
    assert "time (cost units)" in text
    custom = plot_timeline(timeline, tmp_path / "c.svg", title="my run").read_text()
    assert "my run" in custom
    assert "vs ideal compute" in custom


def test_big_schedule_skips_labels_that_do_not_fit(tmp_path: Path) -> None:
    timeline = simulated("1f1b", 16, 64)
    out = plot_timeline(timeline, tmp_path / "big.svg")
    labels = svg_labels(out.read_text())
    assert len(svg_boxes(out)) == len(timeline.events) == 2048
    # Boxes of one op are equally wide: each op is labelled everywhere or nowhere, and the
    # wider backward boxes are labelled whenever the forward ones are.
    counts = {op: sum(Op(re.sub(r"\d", "", x)) is op for x in labels) for op in (Op.F, Op.B)}
    assert counts[Op.B] in (0, 16 * 64)
    assert counts[Op.F] in (0, 16 * 64)
    assert counts[Op.B] >= counts[Op.F]
    assert 0 < len(labels) < len(timeline.events)


def test_measured_timeline_is_drawn_in_milliseconds(tmp_path: Path) -> None:
    text = plot_timeline(measured_timeline(), tmp_path / "m.svg").read_text()
    assert "time (ms)" in text
    assert "(measured)" in text
    assert "makespan 8 ms" in text


@pytest.mark.parametrize("suffix", [".jpg", ".pdf", ""])
def test_unknown_suffix_is_a_config_error_naming_the_formats(tmp_path: Path, suffix: str) -> None:
    timeline = simulated("gpipe", 2, 2)
    draws: list[Callable[[Path], object]] = [
        lambda path: plot_timeline(timeline, path),
        lambda path: plot_memory(timeline, path),
        lambda path: compare_timelines(timeline, timeline, path),
    ]
    for draw in draws:
        with pytest.raises(ConfigError, match=r"\.png, \.svg"):
            draw(tmp_path / f"out{suffix}")
    assert not list(tmp_path.iterdir())


def test_compare_stacks_predicted_over_measured(tmp_path: Path) -> None:
    predicted = simulated("gpipe", 2, 1)
    out = compare_timelines(predicted, measured_timeline(), tmp_path / "cmp.svg")
    text = out.read_text()
    heights = {}
    for element in ET.parse(out).getroot().iter(f"{SVG}text"):
        if element.text and " \u2013 gpipe: 2 ranks" in element.text:
            shift = re.search(r"translate\(\S+ (\S+)\)", element.get("transform", ""))
            assert shift is not None
            heights[element.text.split()[0]] = float(shift.group(1))
    assert heights["predicted"] < heights["measured"]  # SVG y grows downwards: predicted on top
    assert len(svg_labels(text)) == 8
    png = compare_timelines(predicted, measured_timeline(), tmp_path / "cmp.png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE


# --- memory ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "v"), SCHEDULES)
def test_memory_png_is_written(tmp_path: Path, name: str, v: int) -> None:
    out = plot_memory(simulated(name, 4, 8, v), tmp_path / "mem.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_memory_marks_each_ranks_peak_in_units_and_mib(tmp_path: Path) -> None:
    # 1F1B, p=4: rank r holds p - r micro-batches at its peak.
    schedule = build("1f1b", num_ranks=4, num_microbatches=8)
    text = plot_memory(simulate(schedule), tmp_path / "mem.svg").read_text()
    assert [int(x) for x in re.findall(r">peak (\d+)<", text)] == [4, 3, 2, 1]
    assert "live activations (stage-micro-batches)" in text
    sized = simulate(schedule, Costs.uniform(schedule, activation_bytes=64 * 2**20))
    text = plot_memory(sized, tmp_path / "bytes.svg", in_bytes=True).read_text()
    assert re.findall(r">peak (\d+) MiB<", text) == ["256", "192", "128", "64"]
    assert "live activations (MiB)" in text


def test_memory_in_bytes_without_sizes_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="activation sizes"):
        plot_memory(simulated("gpipe", 2, 2), tmp_path / "m.png", in_bytes=True)


def test_memory_with_many_ranks_uses_one_panel(tmp_path: Path) -> None:
    text = plot_memory(simulated("1f1b", 16, 16), tmp_path / "m.svg").read_text()
    assert "rank 15" in text
    assert "live activations (stage-micro-batches)" in text


# --- Chrome trace ----------------------------------------------------------------------------


def x_events(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


@pytest.mark.parametrize(("name", "v"), SCHEDULES)
def test_trace_has_one_complete_event_per_action(name: str, v: int) -> None:
    schedule = build(name, num_ranks=4, num_microbatches=8, num_chunks=v)
    trace = chrome_trace(simulate(schedule))
    actions = [(rank, str(a)) for rank, row in enumerate(schedule.actions) for a in row]
    assert sorted((e["tid"], e["name"]) for e in x_events(trace)) == sorted(actions)
    assert json.loads(json.dumps(trace)) == trace
    assert trace["displayTimeUnit"] == "ms"
    for event in x_events(trace):
        args = event["args"]
        assert event["cat"] == args["op"] == event["name"][len(str(args["stage"]))]
        assert args["chunk"] == args["stage"] // 4  # looped placement: stage = chunk*p + rank


def test_trace_times_match_hand_worked_gpipe() -> None:
    # GPipe p=2 m=2, F=1, B=2 cost units, one unit = 1000 us:
    # rank 1 runs 1F0 [1, 2), 1F1 [2, 3), 1B0 [3, 5), 1B1 [5, 7); rank 0 then 0B0 [5, 7).
    trace = chrome_trace(simulated("gpipe", 2, 2))
    by_name = {e["name"]: e for e in x_events(trace)}
    assert (by_name["1F0"]["ts"], by_name["1F0"]["dur"]) == (1000.0, 1000.0)
    assert (by_name["1B0"]["ts"], by_name["1B0"]["dur"]) == (3000.0, 2000.0)
    assert (by_name["0B0"]["ts"], by_name["0B0"]["tid"]) == (5000.0, 0)
    assert by_name["1B1"]["args"] == {"stage": 1, "microbatch": 1, "op": "B", "chunk": 0}
    assert trace["otherData"]["microseconds_per_unit"] == 1000.0
    assert "1 ms" in trace["otherData"]["clock"]


def test_trace_names_the_process_and_every_rank() -> None:
    trace = chrome_trace(simulated("1f1b", 4, 4))
    meta = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    threads = {e["tid"]: e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert threads == {r: f"rank {r}" for r in range(4)}
    (process,) = [e for e in meta if e["name"] == "process_name"]
    assert "1f1b" in process["args"]["name"]
    assert "simulated" in process["args"]["name"]


def test_trace_counters_follow_live_activations() -> None:
    timeline = simulated("1f1b", 4, 8)
    trace = chrome_trace(timeline)
    for rank in range(4):
        values = [
            (e["ts"], e["args"]["stage-micro-batches"])
            for e in trace["traceEvents"]
            if e["ph"] == "C" and e["name"] == f"live activations rank {rank}"
        ]
        assert max(v for _, v in values) == timeline.peak_activations(rank) == 4 - rank
        assert values[-1][1] == 0
        assert len({ts for ts, _ in values}) == len(values)  # one value per instant


@pytest.mark.parametrize(("name", "v"), SCHEDULES)
def test_trace_flows_link_producer_to_consumer_across_ranks(name: str, v: int) -> None:
    # Looped placement puts every stage boundary between two ranks: each of the m
    # micro-batches sends an activation and a gradient across each of the S - 1 boundaries.
    p, m = 4, 8
    trace = chrome_trace(simulated(name, p, m, v))
    starts = {e["id"]: e for e in trace["traceEvents"] if e["ph"] == "s"}
    ends = {e["id"]: e for e in trace["traceEvents"] if e["ph"] == "f"}
    assert len(starts) == len(ends) == 2 * (p * v - 1) * m
    slices = {(e["tid"], e["name"]): e for e in x_events(trace)}

    def enclosing(flow: dict[str, Any]) -> str:
        found: str
        (found,) = [
            label
            for (tid, label), x in slices.items()
            if tid == flow["tid"] and x["ts"] <= flow["ts"] <= x["ts"] + x["dur"]
        ]
        return found

    for flow_id, start in starts.items():
        end = ends[flow_id]
        assert end["bp"] == "e"
        assert start["name"] == end["name"]
        assert start["tid"] != end["tid"]
        producer, consumer = enclosing(start), enclosing(end)
        stage, op, microbatch = re.fullmatch(r"(\d+)([FB])(\d+)", producer).groups()  # type: ignore[union-attr]
        step = 1 if op == "F" else -1
        assert consumer == f"{int(stage) + step}{op}{microbatch}"
        assert start["name"] == ("activation" if op == "F" else "gradient")


def test_trace_slices_on_a_rank_never_overlap_after_rounding() -> None:
    # Perfetto stores ts and dur as whole nanoseconds, llround(x * 1000) each. Costs of 1/3 do
    # not land on nanoseconds: converting start and duration separately rounds 2/3 + 2/3 to
    # 666667 + 666667 ns, 1 ns past the next slice's 1333333 ns, and Perfetto would nest it.
    schedule = build("1f1b", num_ranks=3, num_microbatches=6)
    timeline = simulate(schedule, Costs.uniform(schedule, forward=1 / 3, backward=2 / 3))
    by_rank: dict[int, list[tuple[int, int]]] = {}
    for event in x_events(chrome_trace(timeline)):
        start = round(event["ts"] * 1000)
        by_rank.setdefault(event["tid"], []).append((start, start + round(event["dur"] * 1000)))
    for spans in by_rank.values():
        spans.sort()
        assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))


def test_measured_trace_converts_seconds_to_microseconds(tmp_path: Path) -> None:
    out = write_chrome_trace(measured_timeline(), tmp_path / "sub" / "trace.json")
    trace = json.loads(out.read_text())
    by_name = {e["name"]: e for e in x_events(trace)}
    assert by_name["0F0"]["ts"] == pytest.approx(0.0)
    assert by_name["0F0"]["dur"] == pytest.approx(1500.0)
    assert by_name["1B0"]["ts"] == pytest.approx(3000.0)
    assert by_name["0B0"]["dur"] == pytest.approx(2200.0)
    assert trace["otherData"]["microseconds_per_unit"] == 1e6
    assert trace["otherData"]["source"] == "measured"


def test_importing_viz_does_not_import_matplotlib() -> None:
    code = "import sys, stagewise.viz; print('matplotlib' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split() == ["False", "False"]
