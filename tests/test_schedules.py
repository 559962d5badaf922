"""The IR, its text and CSV forms, the generators' exact tables, and the registry."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stagewise.errors import ScheduleError
from stagewise.schedules import (
    Action,
    Op,
    Schedule,
    build,
    check,
    get,
    gpipe,
    interleaved_1f1b,
    names,
    one_f_one_b,
    parse_action,
)


def rows(schedule: Schedule) -> list[str]:
    return [" ".join(str(a) for a in row) for row in schedule.actions]


def test_action_text_form_round_trips() -> None:
    action = Action(2, Op.F, 0)
    assert str(action) == "2F0"
    assert parse_action("2F0") == action
    assert parse_action(" 12W305 ") == Action(12, Op.W, 305)


@pytest.mark.parametrize("text", ["", "F0", "2X0", "2F", "-1F0", "2F0x"])
def test_parse_action_rejects_malformed(text: str) -> None:
    with pytest.raises(ScheduleError, match="write <stage><op><microbatch>"):
        parse_action(text)


def test_gpipe_table() -> None:
    assert rows(gpipe(2, 3)) == [
        "0F0 0F1 0F2 0B0 0B1 0B2",
        "1F0 1F1 1F2 1B0 1B1 1B2",
    ]


def test_one_f_one_b_table() -> None:
    # Rank r warms up with p - r - 1 forwards, then alternates, then drains.
    assert rows(one_f_one_b(3, 4)) == [
        "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3",
        "1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3",
        "2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3",
    ]


def test_one_f_one_b_fewer_microbatches_than_ranks() -> None:
    # The warm-up is capped at m: rank 0 must not wait for a third forward that never comes.
    schedule = one_f_one_b(4, 2)
    assert rows(schedule)[0] == "0F0 0F1 0B0 0B1"
    check(schedule)


def test_interleaved_table() -> None:
    # p=2, v=2, m=4: groups {0,1} and {2,3}; rank 0 holds stages 0 and 2, rank 1 stages 1 and 3.
    # Warm-up: rank 0 (v-1)*2 + 2*(p-1) = 4 forwards, rank 1 (v-1)*2 = 2.
    schedule = interleaved_1f1b(2, 4, 2)
    assert schedule.placement == (0, 1, 0, 1)
    assert rows(schedule) == [
        "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3",
        "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3",
    ]


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["gpipe", "1f1b", "interleaved-1f1b"]),
    p=st.integers(1, 8),
    m=st.integers(1, 20),
    v=st.integers(1, 4),
)
def test_every_generated_schedule_is_complete_and_placed(name: str, p: int, m: int, v: int) -> None:
    chunks = v if name == "interleaved-1f1b" else 1
    schedule = build(name, num_ranks=p, num_microbatches=m, num_chunks=chunks)
    assert schedule.num_stages == p * chunks
    seen: dict[tuple[int, Op, int], int] = {}
    for rank, row in enumerate(schedule.actions):
        for action in row:
            assert schedule.rank_of(action.stage) == rank
            seen[(action.stage, action.op, action.microbatch)] = seen.get(
                (action.stage, action.op, action.microbatch), 0) + 1
    for stage in range(schedule.num_stages):
        for j in range(m):
            assert seen[(stage, Op.F, j)] == 1
            assert seen[(stage, Op.B, j)] == 1
    assert sum(seen.values()) == 2 * schedule.num_stages * m


def test_csv_round_trip_and_inference() -> None:
    schedule = build("interleaved-1f1b", num_ranks=2, num_microbatches=4, num_chunks=2)
    loaded = Schedule.from_csv(schedule.to_csv(), name=schedule.name)
    assert loaded.actions == schedule.actions
    assert loaded.placement == schedule.placement
    assert loaded.num_microbatches == 4
    assert loaded.num_chunks == 2


def test_csv_skips_torch_idle_cells() -> None:
    loaded = Schedule.from_csv("0F0,,0B0\n,1F0,1B0\n")
    assert rows(loaded) == ["0F0 0B0", "1F0 1B0"]


def test_csv_errors_name_the_problem() -> None:
    with pytest.raises(ScheduleError, match="line 2"):
        Schedule.from_csv("0F0,0B0\n1F0,oops\n")
    with pytest.raises(ScheduleError, match="stage 0 has actions on rank 0 and on rank 1"):
        Schedule.from_csv("0F0,0B0\n0F1,0B1\n")
    with pytest.raises(ScheduleError, match="no actions"):
        Schedule.from_csv("\n\n")


def test_csv_interoperates_with_torch(tmp_path: Path) -> None:
    torch_schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    action_type = torch_schedules._Action
    kinds = {Op.F: "FORWARD", Op.B: "FULL_BACKWARD", Op.I: "BACKWARD_INPUT",
             Op.W: "BACKWARD_WEIGHT"}
    schedule = Schedule.from_csv("0F0,0F1,0B0,0B1\n1F0,1I0,1F1,1I1,1W0,1W1\n", name="zb")
    # stagewise -> torch: read our file the way torch's _load_csv does.
    path = tmp_path / "ours.csv"
    schedule.save_csv(path)
    with path.open(newline="") as file:
        theirs = [[action_type.from_str(cell) for cell in row] for row in csv.reader(file)]
    for our_row, their_row in zip(schedule.actions, theirs, strict=True):
        for ours, their in zip(our_row, their_row, strict=True):
            assert their.stage_index == ours.stage
            assert their.microbatch_index == ours.microbatch
            assert their.computation_type.name == kinds[ours.op]
    # torch -> stagewise: write torch's actions the way its _dump_csv does (None = idle step).
    back = tmp_path / "theirs.csv"
    with back.open("w", newline="") as file:
        writer = csv.writer(file)
        for row in theirs:
            writer.writerow([None, *row])
    assert Schedule.load_csv(back).actions == schedule.actions


def test_registry_lists_names_on_unknown() -> None:
    assert {"gpipe", "1f1b", "interleaved-1f1b"} <= set(names())
    with pytest.raises(ScheduleError, match="choose one of gpipe, 1f1b"):
        build("2f2b", num_ranks=2, num_microbatches=2)


@pytest.mark.parametrize(
    ("name", "p", "m", "v", "message"),
    [
        ("1f1b", 0, 4, None, "p must be a positive integer, got 0"),
        ("gpipe", 2, -1, None, "m must be a positive integer, got -1"),
        ("1f1b", 2, 4, 2, "runs exactly 1 chunk"),
        ("interleaved-1f1b", 2, 4, 0, "v must be a positive integer"),
    ],
)
def test_build_rejects_bad_sizes(name: str, p: int, m: int, v: int | None, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        build(name, num_ranks=p, num_microbatches=m, num_chunks=v)


@pytest.mark.parametrize("name", names())
def test_generator_counts_its_actions_before_building(name: str) -> None:
    generator = get(name)
    for p, m, v in ((2, 3, None), (4, 8, 2), (3, 9, 1), (4, 16, 3)):
        try:
            schedule = build(name, num_ranks=p, num_microbatches=m, num_chunks=v)
        except ScheduleError:
            continue
        planned = generator.num_actions(p, m, v)
        if name in ("dualpipev", "auto"):  # some or all backwards split: at most 3 per pair
            assert schedule.num_actions <= planned
        else:
            assert schedule.num_actions == planned
