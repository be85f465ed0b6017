"""The pause marker a failed disk write leaves for ``status`` (``coordinator.pause``)."""

from __future__ import annotations

from pathlib import Path

from coordinator.pause import PAUSE_FILE, Pause, clear_pause, read_pause, write_pause


def test_a_pause_is_recorded_read_back_and_cleared(tmp_path: Path) -> None:
    pause = Pause("run-1", 3, "storage.write", "[Errno 28] No space left on device", 12.5)
    assert read_pause(tmp_path) is None

    write_pause(tmp_path, pause)

    assert read_pause(tmp_path) == pause
    assert "restart the coordinator" in pause.to_dict()["advice"]
    assert clear_pause(tmp_path) == pause
    assert read_pause(tmp_path) is None and not (tmp_path / PAUSE_FILE).exists()
    assert clear_pause(tmp_path) is None


def test_an_unreadable_marker_still_reads_as_a_pause(tmp_path: Path) -> None:
    """A marker torn or edited by hand never hides that the run was paused."""
    (tmp_path / PAUSE_FILE).write_text('{"run_id": "run-1", "round": ')

    pause = read_pause(tmp_path)

    assert pause is not None and pause.code == "storage.pause_marker"
    assert f"{PAUSE_FILE} cannot be read" in pause.reason
