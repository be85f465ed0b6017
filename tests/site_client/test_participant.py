"""The site's participation loop, without a coordinator: backoff and an unreachable server."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path

import pytest

from shared.crypto.keys import generate_signing_key, public_key_b64, save_private_key
from shared.errors import ConnectionFailed
from site_client.core.config import SiteConfig, SiteConfigError, SiteDir
from site_client.core.participant import Backoff, LocalData, Participant


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    backoff = Backoff(base_s=0.5, cap_s=8.0)
    rng = random.Random(1)
    for attempt in range(12):
        ceiling = min(8.0, 0.5 * 2**attempt)
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.8 * ceiling  # jitter spans the range, so sites spread out


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _enrolled_site(tmp_path: Path, port: int) -> SiteDir:
    site_dir = SiteDir(tmp_path / "site")
    site_dir.ensure()
    key = generate_signing_key()
    save_private_key(key, site_dir.key_file)
    site_dir.save(
        SiteConfig(
            site_id="site-test",
            site_name="Test Hospital",
            federation="Test",
            coordinator_url=f"wss://127.0.0.1:{port}",
            fingerprint="ab" * 32,
            coordinator_key=public_key_b64(generate_signing_key()),
            enrolled_at=0.0,
        )
    )
    return site_dir


def test_an_unreachable_coordinator_is_retried_then_reported(tmp_path: Path) -> None:
    site_dir = _enrolled_site(tmp_path, _closed_port())
    statuses: list[str] = []
    participant = Participant(
        site_dir,
        LocalData(tmp_path / "dicom", tmp_path / "labels.csv"),
        backoff=Backoff(base_s=0.01, cap_s=0.05),
        on_status=statuses.append,
    )
    with pytest.raises(ConnectionFailed, match="after 3 attempts") as info:
        asyncio.run(participant.run(max_attempts=3))
    assert info.value.code == "net.unreachable"
    assert len(statuses) == 3  # each failed attempt was shown to the user
    assert all("connection lost" in s or "unreachable" in s for s in statuses)


def test_a_site_that_never_enrolled_is_told_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match="not enrolled yet") as info:
        Participant(SiteDir(tmp_path / "nowhere"), LocalData(tmp_path, tmp_path / "l.csv"))
    assert info.value.code == "config.not_enrolled"
