"""The PACS receiver's saved settings and the app's text box of allowed callers."""

from __future__ import annotations

from pathlib import Path

import pytest

from site_client.core.config import SiteDir
from site_client.core.intake.pacs import PacsReceiverError
from site_client.core.pacs_settings import (
    LOOPBACK,
    PacsSettings,
    load_pacs_settings,
    parse_callers,
    save_pacs_settings,
)
from site_client.core.status import Connection, connection_text


def test_callers_one_per_line_or_comma_spaces_kept() -> None:
    text = "PACS1\n CT SCANNER 2 , MR3;\n\nPACS1\n"
    assert parse_callers(text) == ("PACS1", "CT SCANNER 2", "MR3")
    assert parse_callers("  \n ,") == ()


def test_settings_round_trip_and_defaults(tmp_path: Path) -> None:
    site_dir = SiteDir(tmp_path / "site")
    assert load_pacs_settings(site_dir) == PacsSettings()
    saved = PacsSettings(ae_title="NORTH", port=104, allowed_aes=("PACS1", "CT 2"), host=LOOPBACK)
    save_pacs_settings(site_dir, saved)
    assert load_pacs_settings(site_dir) == saved
    (site_dir.root / "pacs.json").write_text("{not json")
    assert load_pacs_settings(site_dir) == PacsSettings()


def test_the_receiver_checks_the_settings(tmp_path: Path) -> None:
    site_dir = SiteDir(tmp_path / "site")
    with pytest.raises(PacsReceiverError, match="Name at least one PACS AE title") as info:
        PacsSettings(allowed_aes=()).receiver(site_dir)
    assert info.value.code == "pacs.config"
    with pytest.raises(PacsReceiverError, match="is not a valid DICOM AE title"):
        PacsSettings(ae_title="A" * 17, allowed_aes=("PACS1",)).receiver(site_dir)
    receiver = PacsSettings(allowed_aes=("PACS1",), port=0, host=LOOPBACK).receiver(site_dir)
    assert (receiver.ae_title, receiver.allowed_aes, receiver.host) == (
        "TESSERA",
        ["PACS1"],
        LOOPBACK,
    )


@pytest.mark.parametrize(
    ("state", "short"),
    [
        (Connection.NOT_ENROLLED, "Not enrolled"),
        (Connection.OFFLINE, "Not connected"),
        (Connection.CONNECTING, "Connecting to coord.example.org"),
        (Connection.CONNECTED, "Connected to coord.example.org"),
        (Connection.FAILED, "Cannot reach coord.example.org"),
    ],
)
def test_connection_states_in_words(state: Connection, short: str) -> None:
    text, tip = connection_text(state, "wss://coord.example.org:8443")
    assert text == short and tip
