"""First-run checks of the site app's wizard, without Qt: data folder, invitation code."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from shared.errors import ConnectionFailed
from shared.identity.invitation import Invitation, encode_invitation, new_token
from site_client.core.config import SiteConfig, SiteConfigError, SiteDir
from site_client.core.onboarding import (
    check_data_folder,
    check_invitation,
    enrol_site,
    format_fingerprint,
    time_left,
)

NOW = 1_800_000_000
FINGERPRINT = hashlib.sha256(b"certificate").hexdigest()


def _code(url: str = "wss://coord.example.org:8443", expires_at: int = NOW + 3600) -> str:
    return encode_invitation(
        Invitation(
            coordinator_url=url,
            fingerprint=FINGERPRINT,
            token=new_token(),
            federation="Chest X-ray study",
            expires_at=expires_at,
        )
    )


def _enrolled(root: Path) -> SiteConfig:
    config = SiteConfig(
        site_id="s1",
        site_name="North",
        federation="Chest X-ray study",
        coordinator_url="wss://coord.example.org:8443",
        fingerprint=FINGERPRINT,
        coordinator_key="",
        enrolled_at=NOW,
    )
    SiteDir(root).save(config)
    return config


def test_a_new_folder_is_usable_and_will_be_created(tmp_path: Path) -> None:
    check = check_data_folder(str(tmp_path / "tessera" / "site"))
    assert check.usable and check.enrolled is None
    assert check.message == "The folder will be created."
    assert check.site_dir.root == tmp_path / "tessera" / "site"
    assert not (tmp_path / "tessera").exists()  # checking writes nothing


def test_an_enrolled_folder_is_opened_again(tmp_path: Path) -> None:
    config = _enrolled(tmp_path / "site")
    check = check_data_folder(tmp_path / "site")
    assert check.usable and check.enrolled == config
    assert "already holds the site 'North'" in check.message


def test_a_folder_with_imported_images_keeps_them(tmp_path: Path) -> None:
    SiteDir(tmp_path).open_index().close()
    check = check_data_folder(tmp_path)
    assert check.usable and check.message.startswith("Images were already imported")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: "", "Choose a folder"),
        (lambda p: (p / "f.txt").write_text("x") and str(p / "f.txt"), "is a file, not a folder"),
        (lambda p: (p / "site.json").write_text("{broken") and str(p), "is damaged"),
    ],
)
def test_unusable_folders_say_why(tmp_path: Path, make, expected: str) -> None:
    check = check_data_folder(make(tmp_path))
    assert not check.usable
    assert expected in check.message
    with pytest.raises(SiteConfigError, match=expected):
        _ = check.site_dir


def test_a_folder_without_write_access_is_refused(tmp_path: Path, monkeypatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    # The suite may run as root, who may write anywhere: ask the OS question the check asks,
    # answered as it is for an ordinary user on this folder.
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode)
    )
    check = check_data_folder(locked / "site")
    assert not check.usable and "cannot write" in check.message
    assert str(locked) in check.message


def test_a_good_code_shows_where_it_leads_before_anything_is_sent() -> None:
    check = check_invitation("  " + _code().lower() + "\n", NOW)
    assert check.ok and check.invitation is not None
    assert (check.host, check.port) == ("coord.example.org", 8443)
    assert check.invitation.fingerprint == FINGERPRINT
    assert check.invitation.federation == "Chest X-ray study"


def test_a_port_less_address_means_443() -> None:
    assert check_invitation(_code("wss://coord.example.org"), NOW).port == 443


@pytest.mark.parametrize(
    ("text", "code", "words"),
    [
        ("", "identity.invitation_missing", "Paste the invitation code"),
        ("hello", "identity.invitation_malformed", "should start with TESSERA-1-"),
        (_code()[:-3], "identity.invitation_malformed", "incomplete or mistyped"),
        (_code(expires_at=NOW - 1), "identity.invitation_expired", "has expired"),
    ],
)
def test_bad_codes_are_explained(text: str, code: str, words: str) -> None:
    check = check_invitation(text, NOW)
    assert not check.ok
    assert check.code == code
    assert words in check.problem


def test_fingerprints_are_grouped_for_reading_aloud() -> None:
    shown = format_fingerprint(FINGERPRINT)
    assert shown.replace(" ", "") == FINGERPRINT.upper()
    assert [len(g) for g in shown.split(" ")] == [4] * 16
    assert format_fingerprint("insecure") == "insecure"


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (7 * 86400 - 5, "6 days 23 hours"),
        (86400 + 59, "1 day"),
        (5 * 3600 + 600, "5 hours 10 minutes"),
        (720, "12 minutes"),
        (30, "less than a minute"),
        (0, "expired"),
    ],
)
def test_time_left_in_words(seconds: int, words: str) -> None:
    assert time_left(NOW + seconds, NOW) == words


def test_enrol_site_reports_an_unreachable_coordinator(tmp_path: Path, free_port: int) -> None:
    code = _code(f"wss://127.0.0.1:{free_port}", expires_at=2**40)
    with pytest.raises(ConnectionFailed, match="Cannot reach the coordinator") as info:
        enrol_site(code, tmp_path / "site", "North")
    assert info.value.code == "net.unreachable"
    assert not SiteDir(tmp_path / "site").is_enrolled()


@pytest.fixture
def free_port():
    import socket

    with socket.socket() as sock:  # bound, not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
