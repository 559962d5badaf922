"""The schedule verbs, run in-process through cli([...]) -> int."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from stagewise.cli import cli
from stagewise.schedules import Schedule, names


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    assert cli([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bubble_json_gives_both_definitions(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(capsys, "bubble", "-s", "1f1b", "-p", "4", "-m", "8")
    assert isinstance(result, dict)
    for source in ("closed_form", "simulated"):
        assert result[source]["bubble"]["vs_ideal"] == pytest.approx(3 / 8)
        assert result[source]["bubble"]["of_step"] == pytest.approx(3 / 11)
        assert result[source]["peak_activations"] == [4, 3, 2, 1]


def test_simulate_json_fields(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(capsys, "simulate", "-s", "interleaved-1f1b", "-p", "4", "-m", "8",
                      "-v", "2", "--forward", "1", "--backward", "2")
    assert isinstance(result, dict)
    assert (result["schedule"], result["num_ranks"], result["num_stages"],
            result["num_microbatches"], result["num_chunks"]) == ("interleaved-1f1b", 4, 8, 8, 2)
    assert result["makespan"] == pytest.approx(28.5)
    assert result["bubble"]["vs_ideal"] == pytest.approx(3 / 16)
    assert [r["rank"] for r in result["per_rank"]] == [0, 1, 2, 3]
    assert result["per_rank"][0]["peak_activations"] == pytest.approx(5.5)
    assert result["per_rank"][0]["busy"] + result["per_rank"][0]["idle"] == pytest.approx(28.5)


def test_simulate_per_stage_costs_and_latency(capsys: pytest.CaptureFixture[str]) -> None:
    # Same hand-worked case as test_sim: heavy last stage, latency 0.5 -> makespan 16.
    result = run_json(capsys, "simulate", "-s", "1f1b", "-p", "2", "-m", "2",
                      "--forward", "1,2", "--backward", "2,4", "--latency", "0.5")
    assert isinstance(result, dict)
    assert result["makespan"] == pytest.approx(16)


def test_simulate_human_output_labels_the_bubble(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["simulate", "-s", "gpipe", "-p", "4", "-m", "8"]) == 0
    out = capsys.readouterr().out
    assert "27.27% of the step, 37.50% relative to ideal compute" in out


def test_show_writes_csv_that_round_trips(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "s.csv"
    assert cli(["show", "-s", "1f1b", "-p", "3", "-m", "4", "--csv", str(target)]) == 0
    out = capsys.readouterr().out
    assert "rank  0: 0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3" in out
    assert "in time" in out
    loaded = Schedule.load_csv(target)
    assert str(loaded.actions[2][1]) == "2B0"
    # The file is accepted wherever a schedule name is.
    result = run_json(capsys, "simulate", "--schedule-file", str(target))
    assert isinstance(result, dict)
    assert result["makespan"] == pytest.approx((4 + 3 - 1) * 3)


def test_compare_lists_every_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_json(capsys, "compare", "-p", "4", "-m", "8")
    assert isinstance(rows, list)
    assert [row["schedule"] for row in rows] == names()
    by_name = {row["schedule"]: row for row in rows}
    assert by_name["gpipe"]["bubble"]["vs_ideal"] == pytest.approx(3 / 8)
    assert by_name["interleaved-1f1b"]["bubble"]["vs_ideal"] == pytest.approx(3 / 16)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bubble", "-p", "0", "-m", "8"], "p must be a positive integer, got 0"),
        (["simulate", "-p", "4", "-m", "-2"], "m must be a positive integer"),
        (["simulate", "-s", "gpipe", "-p", "4", "-m", "8", "-v", "2"], "exactly 1 chunk"),
        (["simulate", "-s", "interleaved-1f1b", "-p", "4", "-m", "8", "-v", "0"], "v must be"),
        (["simulate", "-s", "nope", "-p", "4", "-m", "8"], "choose one of gpipe"),
        (["simulate", "-p", "4", "-m", "eight"], "invalid int value"),
        (["simulate", "-p", "2", "-m", "2", "--forward", "1,2,3"], "has 3 values"),
        (["simulate", "-p", "2", "-m", "2", "--weight", "5"], "exceeds the whole backward"),
        (["show"], "pass -p RANKS and -m MICROBATCHES"),
        (["simulate", "-p", "2", "-m", "2", "--plot", "x.jpg"], "write a .png or .svg file"),
        (["compare", "-p", "0", "-m", "4"], "positive integers"),
        (["simulate", "-s", "zb-h1", "-p", "1000", "-m", "1000"],
         "3,000,000 actions, over the simulator's limit of 1,000,000"),
        (["show", "-s", "gpipe", "-p", "4", "-m", "1000000"], "use fewer ranks p or micro"),
        (["bubble", "-s", "zb-v", "-p", "1000", "-m", "1000"], "limit of 1,000,000"),
        (["simulate", "-s", "auto", "-p", "64", "-m", "10000"], "limit of 1,000,000"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("0F0,0F1,0B0\n1F0,1B0,1F1,1B1\n", "stage 0 micro-batch 1 has no backward: add 0B1"),
        ("0F0,0B0\n1F0,1X0\n", "line 2"),
        ("0F0,0B0,0F1,0B1\n1F0,1F1,1B0,1B1\n", "deadlock"),
    ],
)
def test_bad_schedule_file(tmp_path: Path, content: str, message: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert cli(["simulate", "--schedule-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_missing_schedule_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["show", "--schedule-file", "/nonexistent/s.csv"]) == 2
    assert "cannot read schedule file" in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "stagewise", "bubble", "-p", "2", "-m", "2"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "33.33%" in done.stdout  # (p-1)/(m+p-1) = 1/3 of the step


def test_simulate_writes_pictures_and_trace(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    plot, memory, trace = tmp_path / "t.png", tmp_path / "sub" / "m.svg", tmp_path / "t.json"
    assert cli(["simulate", "-s", "1f1b", "-p", "2", "-m", "3", "--plot", str(plot),
                "--memory-plot", str(memory), "--trace", str(trace)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in memory.read_text()
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(1 for e in events if e.get("ph") == "X") == 2 * 2 * 3


def test_simulate_auto_search_meets_the_named_schedules(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Heavy last stage (1.5x) on 4 ranks, 2 chunks, at most 4 stage-micro-batches per rank.
    costs = ["--forward", "1,1,1,1,1,1,1,1.5", "--backward", "2,2,2,2,2,2,2,3"]
    target = tmp_path / "auto.csv"
    found = run_json(capsys, "simulate", "-s", "auto", "-p", "4", "-m", "8", "-v", "2",
                     "--memory-limit", "4", "--search-seconds", "1", "--csv", str(target),
                     *costs)
    assert isinstance(found, dict)
    assert max(r["peak_activations"] for r in found["per_rank"]) <= 4 + 1e-9
    # The busiest rank does 8 x (F + B) of its two chunks: 8 x (0.5 + 0.75 + 1 + 1.5) = 30.
    assert found["search"]["lower_bound"] == pytest.approx(30)
    assert found["makespan"] >= 30 - 1e-9
    for name in ("1f1b", "zb-h1"):
        named = run_json(capsys, "simulate", "-s", name, "-p", "4", "-m", "8",
                         "--forward", "1,1,1,1.5", "--backward", "2,2,2,3")
        assert isinstance(named, dict)
        assert found["makespan"] <= named["makespan"] + 1e-9
    # The saved schedule is a valid CSV that runs through the simulator again.
    assert Schedule.load_csv(target).num_stages == 8


def test_cost_list_per_piece_of_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    # Two pieces (F 1 then 3, B 2 then 6) over 4 virtual stages: each stage is half a piece, so
    # every rank does m x (1 + 3 + 2 + 6) / 2 = 12 units of work; undivided it would be 24.
    result = run_json(capsys, "simulate", "-s", "interleaved-1f1b", "-p", "2", "-m", "2",
                      "-v", "2", "--forward", "1,3", "--backward", "2,6")
    assert isinstance(result, dict)
    assert [r["busy"] for r in result["per_rank"]] == pytest.approx([12, 12])


def test_compare_searches_on_its_own_costs(capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_json(capsys, "compare", "-p", "4", "-m", "8", "--forward", "1,1,1,1.5",
                    "--backward", "2,2,2,3")
    assert isinstance(rows, list)
    by_name = {row["schedule"]: row for row in rows}
    auto = next(row for name, row in by_name.items() if name.startswith("auto"))
    fitting = [row["makespan"] for row in rows if "makespan" in row
               and max(r["peak_activations"] for r in row["per_rank"]) <= 4 + 1e-9]
    assert auto["makespan"] <= min(fitting) + 1e-9


def test_huge_inputs_are_refused_before_the_work(capsys: pytest.CaptureFixture[str]) -> None:
    # compare -p 100000 -m 8 ran for minutes; bubble -m 1000000 for over a minute.
    start = time.monotonic()
    rows = run_json(capsys, "compare", "-p", "100000", "-m", "8")
    assert [row["schedule"] for row in rows] == names()
    assert all("over the simulator's limit of 1,000,000" in row["error"] for row in rows)
    result = run_json(capsys, "bubble", "-s", "1f1b", "-p", "4", "-m", "1000000")
    assert time.monotonic() - start < 10
    assert result["simulated"] is None
    assert "8,000,000 actions" in result["skipped"]
    assert result["closed_form"]["bubble"]["vs_ideal"] == pytest.approx(3 / 1_000_000)
    assert result["closed_form"]["peak_activations"] == [4, 3, 2, 1]
    assert cli(["bubble", "-s", "interleaved-1f1b", "-p", "8", "-m", "100000", "-v", "4"]) == 0
    assert "simulated       (skipped: interleaved-1f1b with p=8, m=100000, v=4 has 6,400,000" \
        in capsys.readouterr().out

