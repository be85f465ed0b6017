"""The fault-injection proxy itself, against a plain echo server on loopback.

Each fault is checked from both ends: what the client sees (timing, EOF, silence) and what
the server received (nothing, while black-holed; a closed connection after a cut).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import socketserver
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from .proxy import FaultProxy

pytestmark = pytest.mark.timeout(20)

TIMEOUT = 3.0


class EchoServer:
    """Echoes every byte back; records what it received and which connections ended."""

    def __init__(self) -> None:
        self.received = 0
        self.ended = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> EchoServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # Server.close_clients() is Python 3.13+
            writer.close()

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return ("127.0.0.1", self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while data := await reader.read(65536):
                self.received += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.ended += 1
            writer.close()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    async with EchoServer() as server:
        yield server


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(echo.address) as p:
        yield p


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_open: list[asyncio.StreamWriter] = []


async def connect(p: FaultProxy) -> Conn:
    reader, writer = await asyncio.open_connection(*p.address)
    _open.append(writer)
    return reader, writer


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _open:
        _open.pop().close()


async def round_trip(conn: Conn, data: bytes) -> tuple[bytes, float]:
    reader, writer = conn
    started = time.monotonic()
    writer.write(data)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(data)), TIMEOUT)
    return got, time.monotonic() - started


async def test_bytes_pass_through_unchanged_and_are_counted(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    payload = os.urandom(300_000)  # several reads and queue entries each way
    conn = await connect(proxy)

    got, _ = await round_trip(conn, payload)

    assert got == payload
    (link,) = proxy.links()
    assert (link.up, link.down, link.dropped) == (len(payload), len(payload), 0)
    assert (link.open, link.cut) == (True, False)
    assert proxy.bytes_forwarded == 2 * len(payload) == 2 * echo.received


async def test_a_client_closing_reaches_the_server_and_ends_the_link(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    reader, writer = await connect(proxy)
    await round_trip((reader, writer), b"hello")

    writer.write_eof()  # half-close: the server sees EOF, answers with its own
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    (link,) = await proxy.wait_for_async(lambda links: not links[0].open)

    assert echo.ended == 1 and not link.cut
    writer.close()


async def test_delay_adds_latency_each_way(proxy: FaultProxy) -> None:
    conn = await connect(proxy)
    _, clean = await round_trip(conn, b"ping")

    proxy.delay(0.1)
    got, slow = await round_trip(conn, b"ping")

    assert got == b"ping"
    assert slow >= 0.2  # 0.1 s up, 0.1 s down
    assert slow < 0.2 + 1.0 and clean < 0.1  # an undelayed round trip: under one way's delay


async def test_a_link_of_its_own_overrides_the_global_setting(proxy: FaultProxy) -> None:
    first, second = await connect(proxy), await connect(proxy)
    await proxy.wait_for_async(lambda links: len(links) == 2)
    a, b = (s.id for s in proxy.links())

    proxy.delay(0.2, link=a)
    (_, slow), (_, fast) = await round_trip(first, b"x"), await round_trip(second, b"y")
    assert slow >= 0.4 and fast < 0.2  # delayed round trips take 2 x 0.2 s

    proxy.delay(0.2)  # globally: now the second link and new ones are slow too
    third = await connect(proxy)
    (_, second_slow), (_, third_slow) = (
        await round_trip(second, b"y"),
        await round_trip(third, b"z"),
    )
    assert second_slow >= 0.4 and third_slow >= 0.4

    proxy.heal()  # the global setting is clean again; link a keeps its own
    proxy.delay(0.0, link=b)
    (_, a_slow), (_, b_fast) = await round_trip(first, b"x"), await round_trip(second, b"y")
    assert a_slow >= 0.4 and b_fast < 0.2
    proxy.heal(link=a)  # follows the (clean) global setting again
    _, a_fast = await round_trip(first, b"x")
    assert a_fast < 0.2


async def test_throttle_caps_the_bandwidth(proxy: FaultProxy) -> None:
    conn = await connect(proxy)
    payload = os.urandom(60_000)
    _, clean = await round_trip(conn, payload)

    proxy.throttle(100_000)  # bytes/s, each direction; the echo pipelines the two
    got, throttled = await round_trip(conn, payload)

    assert got == payload
    assert throttled >= 0.55  # 60 kB at 100 kB/s
    assert throttled < 3.0 and clean < 0.3
    proxy.throttle(None)
    _, unthrottled = await round_trip(conn, payload)
    assert unthrottled < 0.3


async def test_a_black_hole_keeps_the_link_open_and_drops_everything(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    reader, writer = await connect(proxy)
    await round_trip((reader, writer), b"before")
    before = echo.received

    proxy.blackhole()
    writer.write(b"into the void")
    await writer.drain()
    with pytest.raises(TimeoutError):  # no answer, and no EOF either
        await asyncio.wait_for(reader.read(1), 0.3)

    assert echo.received == before  # the server never saw it
    (link,) = proxy.links()
    assert link.open and link.dropped == len(b"into the void")
    assert echo.ended == 0
    proxy.heal()
    got, _ = await round_trip((reader, writer), b"after")
    assert got == b"after"


async def test_a_black_hole_hides_a_close_from_the_other_end(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    reader, writer = await connect(proxy)
    await round_trip((reader, writer), b"hi")
    proxy.blackhole()

    writer.close()
    await asyncio.sleep(0.2)

    assert echo.ended == 0  # the server still thinks the client is there
    assert proxy.open_links() != []


async def test_cut_closes_both_sides_now(proxy: FaultProxy, echo: EchoServer) -> None:
    reader, writer = await connect(proxy)
    await round_trip((reader, writer), b"hi")
    other = await connect(proxy)
    await proxy.wait_for_async(lambda links: len(links) == 2)
    first = proxy.links()[0].id

    assert proxy.cut(first) == [first]

    with contextlib.suppress(ConnectionError):  # EOF or a reset: either way, it is gone
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    await asyncio.wait_for(_until(lambda: echo.ended == 1), TIMEOUT)
    cut, kept = proxy.links()
    assert (cut.open, cut.cut) == (False, True)
    assert kept.open
    got, _ = await round_trip(other, b"still here")
    assert got == b"still here"
    assert proxy.cut() == [kept.id]  # every open link
    assert proxy.open_links() == []
    # The proxy itself still accepts: a reconnect works.
    got, _ = await round_trip(await connect(proxy), b"again")
    assert got == b"again"


async def test_cut_after_cuts_a_link_exactly_after_n_bytes(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    reader, writer = await connect(proxy)
    await round_trip((reader, writer), b"x" * 100)  # counted before arming: not part of n

    proxy.cut_after(1000, "up")
    assert proxy.armed
    writer.write(os.urandom(5000))
    await writer.drain()

    await asyncio.wait_for(_until(lambda: echo.ended == 1), TIMEOUT)
    assert echo.received == 100 + 1000  # the server got exactly n bytes, then the cut
    (link,) = proxy.links()
    assert (link.up, link.open, link.cut) == (1100, False, True)
    assert not proxy.armed  # one shot: a new link is not cut
    got, _ = await round_trip(await connect(proxy), os.urandom(3000))
    assert len(got) == 3000


async def test_cut_after_can_pick_a_link_and_the_download_direction(proxy: FaultProxy) -> None:
    first, second = await connect(proxy), await connect(proxy)
    await proxy.wait_for_async(lambda links: len(links) == 2)
    target = proxy.links()[1].id

    proxy.cut_after(10, "down", link=target)
    got, _ = await round_trip(first, b"a" * 50)  # the other link is not touched
    assert got == b"a" * 50
    second[1].write(b"b" * 50)
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(second[0].read(), TIMEOUT) == b"b" * 10

    assert [(s.down, s.cut) for s in proxy.links()] == [(50, False), (10, True)]
    with pytest.raises(ValueError, match="direction must be 'up' or 'down'"):
        proxy.cut_after(1, "sideways")


async def test_without_an_upstream_a_client_is_refused(echo: EchoServer) -> None:
    async with FaultProxy() as p:
        reader, _ = await connect(p)
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        assert p.refused == 1 and p.links() == []

        p.set_upstream(*echo.address)
        got, _ = await round_trip(await connect(p), b"now")
        assert got == b"now"


def test_bad_settings_are_refused() -> None:
    p = FaultProxy(("127.0.0.1", 9))
    with pytest.raises(ValueError, match="delay must be >= 0 seconds"):
        p.delay(-1)
    with pytest.raises(ValueError, match="throttle must be > 0 bytes/s"):
        p.throttle(0)
    with pytest.raises(KeyError, match="no proxy link 7"):
        p.cut(7)
    with pytest.raises(ValueError, match="byte count >= 0"):
        p.cut_after(-1)


# --- from a sync test: the proxy's loop in a thread ---------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def threaded_echo() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address  # type: ignore[return-value]
    finally:
        server.shutdown()
        server.server_close()


def _sync_round_trip(sock: socket.socket, data: bytes) -> float:
    started = time.monotonic()
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        got += sock.recv(65536)
    assert got == data
    return time.monotonic() - started


def test_runs_in_a_thread_for_sync_tests(threaded_echo: tuple[str, int]) -> None:
    with FaultProxy(threaded_echo) as p, socket.create_connection(p.address, TIMEOUT) as sock:
        sock.settimeout(TIMEOUT)
        assert _sync_round_trip(sock, b"x" * 1000) < 0.1  # under the delay set below
        (link,) = p.wait_for(lambda links: len(links) == 1)

        p.delay(0.1, link=link.id)  # commands cross into the proxy's thread
        assert _sync_round_trip(sock, b"y") >= 0.2
        assert p.bytes_up == p.bytes_down == 1001

        assert p.cut() == [link.id]
        assert sock.recv(10) == b""
    p.stop()  # a second stop is harmless
    with pytest.raises(ConnectionRefusedError), socket.create_connection(p.address, 1):
        pass


async def _until(predicate, step: float = 0.01) -> None:  # type: ignore[no-untyped-def]
    while not predicate():
        await asyncio.sleep(step)
