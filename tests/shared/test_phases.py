"""Per-round phase records: validation, the clock that collects them, their JSON lines file."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.phases import (
    COORDINATOR_PHASES,
    SITE_PHASES,
    PhaseClock,
    RoundTimings,
    append_timings,
    read_timings,
)


def test_a_clock_adds_pieces_and_marked_spans_in_the_sides_order() -> None:
    clock = PhaseClock("site", "run-1", 2, started=100.0, site_id="site-a")
    clock.add("verify", 0.25)
    clock.mark("download", 100.5)
    clock.stop("download", 101.75)
    clock.add("verify", 0.5)  # a phase may happen in pieces
    clock.stop("upload", 103.0)  # never marked: nothing to add
    clock.cpu = 1.5
    record = clock.record(ended=104.0)
    assert record == RoundTimings(
        side="site",
        run_id="run-1",
        round=2,
        site_id="site-a",
        started=100.0,
        ended=104.0,
        phases={"download": 1.25, "verify": 0.75},
        cpu=1.5,
    )
    assert list(record.phases) == [p for p in SITE_PHASES if p in record.phases]
    assert record.seconds == 4.0


def test_records_round_trip_through_a_json_lines_file(tmp_path: Path) -> None:
    path = tmp_path / "timings.jsonl"
    assert read_timings(path) == []  # no file yet
    records = [
        RoundTimings(
            side="coordinator",
            run_id="run-1",
            round=r,
            started=float(r),
            ended=r + 0.5,
            phases=dict.fromkeys(COORDINATOR_PHASES, 0.125),
        )
        for r in (1, 2)
    ]
    for record in records:
        append_timings(path, record)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"side": "site", "run_id": "run-1", "rou')  # torn by a crash mid-write
    assert read_timings(path) == records


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"side": "server"}, "side must be 'site' or 'coordinator'"),
        ({"round": 0}, "round must be an integer >= 1"),
        ({"phases": {"aggregate": 1.0}}, r"unknown site phases \['aggregate'\]"),
        ({"phases": {"train": -0.5}}, "phase train has a negative duration"),
        ({"phases": {"train": float("nan")}}, "train must be a finite number of seconds"),
        ({"ended": float("inf")}, "ended must be a finite number of seconds"),
        ({"cpu": -1.0}, "cpu must not be negative"),
    ],
)
def test_an_invalid_record_cannot_be_built(changes: dict, match: str) -> None:
    fields = {"side": "site", "run_id": "r", "round": 1, "started": 0.0, "ended": 1.0}
    with pytest.raises(ValueError, match=match):
        RoundTimings(**{**fields, **changes})
