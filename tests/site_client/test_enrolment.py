"""Enrolment has a deadline: a coordinator that accepts the TLS connection and then says
nothing fails the attempt with a clear error, and nothing is saved."""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.asyncio.server import serve

from shared.crypto.tls import generate_self_signed, server_ssl_context
from shared.errors import ConnectionFailed
from shared.identity.invitation import Invitation, encode_invitation, new_token
from site_client.core.config import SiteDir
from site_client.core.enrolment import enrol

pytestmark = pytest.mark.timeout(60)


async def test_a_silent_coordinator_times_the_enrolment_out(tmp_path) -> None:
    fingerprint = generate_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem")
    context = server_ssl_context(tmp_path / "cert.pem", tmp_path / "key.pem")
    connected = asyncio.Event()

    async def silent(ws) -> None:  # accepts, never sends the challenge
        connected.set()
        await ws.wait_closed()

    async with serve(silent, "127.0.0.1", 0, ssl=context) as server:
        port = server.sockets[0].getsockname()[1]
        code = encode_invitation(
            Invitation(
                coordinator_url=f"wss://127.0.0.1:{port}",
                fingerprint=fingerprint,
                token=new_token(),
                federation="Silent",
                expires_at=int(time.time()) + 3600,
            )
        )
        site_dir = SiteDir(tmp_path / "site")
        with pytest.raises(ConnectionFailed, match="did not complete the enrolment within 2 s"):
            await enrol(code, site_dir, "Site", timeout_s=2.0)
        assert connected.is_set()
    assert not site_dir.is_enrolled() and not site_dir.key_file.exists()
