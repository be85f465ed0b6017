"""A site behind an HTTP proxy: enrolment and sign-in tunnelled through ``CONNECT``.

The real ``CoordinatorServer`` over TLS on loopback, as in ``test_server_fuzz.py``; the site
side is the real enrolment code and ``connect_pinned``. Enrolment finds the proxy in
``HTTPS_PROXY`` (as a site whose operating system configures it would), sign-in is given it
explicitly (``tessera-site run --proxy URL``); the pin is checked through the tunnel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.server import CoordinatorServer
from shared.crypto.keys import load_private_key
from shared.crypto.signing import sign
from shared.crypto.tls import connect_pinned
from shared.errors import ConnectionFailed
from shared.protocol import signed
from shared.protocol.messages import Challenge, Welcome
from shared.protocol.session import MessageReceived, SiteSession
from site_client.core.config import SiteDir
from site_client.core.enrolment import enrol

from .connect_proxy import ConnectProxy

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 10.0


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CoordinatorServer]:
    fed = Federation.init(tmp_path / "coord", CoordinatorConfig(federation="Proxied", port=0))
    srv = CoordinatorServer(fed, admin_poll_s=0.05)
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(srv.serve(ready=ready.set_result))
    try:
        await asyncio.wait_for(ready, TIMEOUT)
        yield srv
    finally:
        srv.stop()
        await asyncio.wait_for(task, TIMEOUT)
        fed.close()


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("https_proxy", "HTTPS_PROXY", "wss_proxy", "WSS_PROXY", "all_proxy",
                 "ALL_PROXY", "no_proxy", "NO_PROXY", "socks_proxy", "SOCKS_PROXY"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


async def test_a_site_enrols_and_signs_in_through_a_connect_proxy(
    server: CoordinatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = server.fed
    target = f"127.0.0.1:{server.port}"
    async with ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        site_dir = SiteDir(tmp_path / "site")
        config = await asyncio.wait_for(enrol(fed.invite("Behind"), site_dir, "Behind"), TIMEOUT)
        assert proxy.targets == [target]
        assert fed.store.site(config.site_id) is not None
        monkeypatch.delenv("HTTPS_PROXY")

        key = load_private_key(site_dir.key_file)
        session = SiteSession()
        async with connect_pinned(fed.url(), fed.fingerprint(), proxy=proxy.url) as ws:
            assert proxy.targets == [target, target]
            welcome = None
            while welcome is None:
                session.receive_frame(await asyncio.wait_for(ws.recv(), TIMEOUT))
                for event in session.events_received():
                    assert isinstance(event, MessageReceived), event
                    if isinstance(event.message, Challenge):
                        fields = signed.auth_fields(
                            nonce=event.message.nonce,
                            site_id=config.site_id,
                            fingerprint=fed.fingerprint(),
                        )
                        session.authenticate(
                            site_id=config.site_id, signature=sign(key, signed.AUTH, fields)
                        )
                    elif isinstance(event.message, Welcome):
                        welcome = event.message
                for frame in session.data_to_send():
                    await ws.send(frame)
        assert welcome.site_id == config.site_id

        # The pin is checked through the tunnel: a wrong fingerprint is refused.
        with pytest.raises(ConnectionFailed, match="fingerprint"):
            async with connect_pinned(fed.url(), "00" * 32, proxy=proxy.url):
                pass
        assert len(proxy.targets) == 3


async def test_without_a_proxy_setting_the_site_connects_directly(
    server: CoordinatorServer,
) -> None:
    async with ConnectProxy() as proxy:
        async with connect_pinned(server.fed.url(), server.fed.fingerprint()) as ws:
            assert ws.protocol.state.name == "OPEN"
        assert proxy.targets == []
