"""A raw websocket fuzzer against a live coordinator, which must go on serving real sites.

Nothing of ours is mocked: the real ``CoordinatorServer`` runs in the test's event loop over
real TLS on loopback, with a real federation directory, as in ``test_server.py``. Hostile
clients then send what no site would: random bytes, text frames, mutated and out-of-place
messages, frames beyond the size limit (whole, announced in a frame header, or as a deflate
bomb), broken websocket framing, connections that stop half-way through a handshake, and a
crowd of unidentified connections guessing invitation tokens. After each attack (and while
the idle ones are still held open) a new site enrols with a real invitation code and an
enrolled site signs in: the coordinator must still serve both, and no connection handler may
have died of an unhandled exception.

Random choices come from seeded ``random.Random`` instances, so a failure replays exactly.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.limits import PeerLimits, Rate
from coordinator.server import CoordinatorServer
from shared.crypto.keys import generate_signing_key, load_private_key, public_key_b64
from shared.crypto.signing import sign
from shared.crypto.tls import connect_pinned, pinned_client_ssl_context
from shared.identity.invitation import decode_invitation, new_token
from shared.plan import demo_plan
from shared.protocol import signed
from shared.protocol.codec import Limits, decode, encode
from shared.protocol.messages import (
    Authenticate,
    Challenge,
    CharterSignature,
    Chunk,
    ChunkAck,
    Enrol,
    ErrorMessage,
    HeadRequest,
    Message,
    PlanDecision,
    RoundDecline,
    RunFinished,
    TransferAccept,
    UpdateAccepted,
    UpdateOffer,
    ValidationReport,
    Welcome,
)
from shared.protocol.session import Closed, MessageReceived, SiteSession
from site_client.core.config import SiteDir
from site_client.core.enrolment import enrol

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 5.0
LIMITS = Limits(max_header_bytes=16 * 1024, max_payload_bytes=256 * 1024, chunk_size=64 * 1024)
HEX = "ab" * 32
GUESSER = "127.0.0.2"  # another loopback address (Linux routes all of 127/8 to lo)


# --- the coordinator --------------------------------------------------------------------


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CoordinatorServer]:
    async with serving(tmp_path) as srv:
        yield srv


@asynccontextmanager
async def serving(
    tmp_path: Path, peer_limits: PeerLimits = PeerLimits()
) -> AsyncIterator[CoordinatorServer]:
    fed = Federation.init(tmp_path / "coord", CoordinatorConfig(federation="Fuzz", port=0))
    srv = CoordinatorServer(fed, limits=LIMITS, admin_poll_s=0.05, peer_limits=peer_limits)
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(srv.serve(ready=ready.set_result))
    try:
        await asyncio.wait({task, ready}, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        assert ready.done(), "the server did not report its port"
        yield srv
    finally:
        srv.stop()
        await asyncio.wait_for(task, TIMEOUT)
        for pending in list(srv._tasks):
            pending.cancel()
        fed.close()


@pytest.fixture
def fed(server: CoordinatorServer) -> Federation:
    return server.fed


@pytest.fixture(autouse=True)
def no_handler_died(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """websockets logs "connection handler failed" when a handler raises: a coordinator bug
    that the peer provoked. None may happen, whatever the fuzzer sends."""
    caplog.set_level(logging.ERROR)
    yield
    died = [
        r
        for r in caplog.records
        if "handler failed" in r.getMessage() or "exception was never retrieved" in r.getMessage()
    ]
    assert not died, [(r.getMessage(), r.exc_text) for r in died]


# --- well-behaved sites, for the checks -------------------------------------------------


async def signed_in(fed: Federation, site_id: str, key: Ed25519PrivateKey) -> Welcome:
    """Authenticate ``site_id`` over a fresh pinned connection; returns the Welcome."""
    session = SiteSession()
    async with connect_pinned(fed.url(), fed.fingerprint(), open_timeout=TIMEOUT) as ws:
        while True:
            session.receive_frame(await asyncio.wait_for(ws.recv(), TIMEOUT))
            for event in session.events_received():
                assert not isinstance(event, Closed), event
                assert isinstance(event, MessageReceived), event
                message = event.message
                if isinstance(message, Challenge):
                    fields = signed.auth_fields(
                        nonce=message.nonce, site_id=site_id, fingerprint=fed.fingerprint()
                    )
                    session.authenticate(site_id=site_id, signature=sign(key, signed.AUTH, fields))
                elif isinstance(message, Welcome):
                    return message
            for frame in session.data_to_send():
                await ws.send(frame)


async def assert_still_serves(server: CoordinatorServer, root: Path, name: str) -> None:
    """A new site enrols with a real invitation and then signs in again on its own."""
    site_dir = SiteDir(root / name)
    config = await asyncio.wait_for(enrol(server.fed.invite(name), site_dir, name), 3 * TIMEOUT)
    assert server.fed.store.site(config.site_id) is not None
    welcome = await signed_in(server.fed, config.site_id, load_private_key(site_dir.key_file))
    assert (welcome.site_id, welcome.site_name) == (config.site_id, name)


@pytest.fixture
async def enrolled(fed: Federation, tmp_path: Path) -> tuple[str, Ed25519PrivateKey]:
    site_dir = SiteDir(tmp_path / "enrolled")
    config = await enrol(fed.invite("Enrolled"), site_dir, "Enrolled")
    return config.site_id, load_private_key(site_dir.key_file)


async def until(predicate: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), TIMEOUT)


# --- hostile clients --------------------------------------------------------------------


class Hostile:
    """A pinned websocket that sends whatever it is told and records what comes back."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.received: list[Message] = []
        self.closed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                assert isinstance(frame, bytes), f"the coordinator sent a text frame: {frame!r}"
                self.received.append(decode(frame))  # only valid frames ever come back
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()

    async def send(self, frame: bytes | str) -> bool:
        """False once the coordinator has closed the connection."""
        if self.closed.is_set():
            return False
        try:
            await self.ws.send(frame)
        except ConnectionClosed:
            return False
        return True

    async def wait_closed(self) -> None:
        await asyncio.wait_for(self.closed.wait(), TIMEOUT)

    def errors(self) -> list[ErrorMessage]:
        return [m for m in self.received if isinstance(m, ErrorMessage)]

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    async def stop(self) -> None:
        """Drop the connection at once. A polite close waits ``close_timeout`` (10 s) when the
        coordinator has stopped reading a connection it kicked out with frames still queued:
        its closing handshake never completes (python-websockets issue #1555)."""
        self._reader.cancel()
        self.ws.transport.abort()


@asynccontextmanager
async def hostile(fed: Federation, **kwargs: Any) -> AsyncIterator[Hostile]:
    async with connect_pinned(fed.url(), fed.fingerprint(), open_timeout=TIMEOUT, **kwargs) as ws:
        client = Hostile(ws)
        try:
            yield client
        finally:
            await client.stop()


def corpus(
    rng: random.Random, site_id: str, run_id: str = "run-x", model: str = HEX
) -> list[Message]:
    """Messages of every type a site or a coordinator might send, with wrong contents; with
    a ``run_id`` and its ``model`` digest, some of them refer to the open round."""
    offer = {"transfer_id": "u-x", "size": rng.randrange(1 << 40), "sha256": HEX, "chunk_size": 1}
    small = {"transfer_id": "u-y", "size": 100, "sha256": HEX, "chunk_size": 64}
    sig = base64.urlsafe_b64encode(rng.randbytes(64)).decode().rstrip("=")
    return [
        TransferAccept(transfer_id="m-" + model, next_index=rng.choice([0, 1, 1 << 40])),
        UpdateOffer(
            run_id=run_id,
            round=1,
            base_model=model,
            update=small,
            num_samples=1,
            train_loss=0.1,
            signature=sig,  # not the site's: refused, and recorded as a rejection
        ),
        RoundDecline(run_id=run_id, round=rng.choice([1, 2]), code="data.empty", reason="r"),
        Enrol(token=new_token(), site_name="Guess", public_key="A" * 43, signature=sig),
        Authenticate(site_id=site_id, signature=sig),
        Authenticate(site_id="site-000000000000", signature=sig),
        ErrorMessage(code="x.y", message="m" * rng.randrange(2000)),
        TransferAccept(transfer_id="m-" + HEX, next_index=rng.randrange(1 << 40)),
        TransferAccept(transfer_id="nope", next_index=0),
        ChunkAck(transfer_id="u-x", next_index=rng.randrange(1 << 20)),
        Chunk(transfer_id="u-x", index=rng.randrange(10), payload=rng.randbytes(100)),
        UpdateOffer(
            run_id="run-x",
            round=rng.randrange(1, 1 << 30),
            base_model=HEX,
            update=offer,
            num_samples=1,
            train_loss=0.1,
            signature=sig,
        ),
        RoundDecline(run_id="run-x", round=1, code="data.empty", reason="r"),
        HeadRequest(known_size=rng.randrange(1 << 40), updates=[{"run_id": "r", "round": 1}]),
        CharterSignature(version=rng.randrange(1, 99), sha256=HEX, person="P", signature=sig),
        PlanDecision(plan_hash=HEX, decision="refuse", reason="no", person="P", signature=sig),
        ValidationReport(
            run_id="run-x",
            round=0,
            model=HEX,
            metrics={
                "auc": 0.5,
                "accuracy": 0.5,
                "sensitivity": 0.5,
                "specificity": 0.5,
                "loss": 1.0,
                "n": 1,
            },
            signature=sig,
        ),
        # Coordinator-to-site messages, which a site must never send.
        Challenge(nonce="n" * 43, federation="Fuzz"),
        Welcome(site_id=site_id, site_name="me", coordinator_key="k", federation="Fuzz"),
        UpdateAccepted(run_id="run-x", round=1, sha256=HEX),
        RunFinished(run_id="run-x", rounds=1, final_model=HEX),
    ]


def fuzz_frame(rng: random.Random, messages: list[Message]) -> bytes | str:
    """One hostile frame: valid but out of place, mutated, random bytes or text."""
    kind = rng.choice(["valid"] * 4 + ["mutated"] * 2 + ["bytes", "text", "header"])
    if kind == "valid":
        return encode(rng.choice(messages))
    if kind == "mutated":
        frame = bytearray(encode(rng.choice(messages)))
        for _ in range(rng.randint(1, 4)):
            frame[rng.randrange(len(frame))] ^= rng.randint(1, 255)
        if rng.random() < 0.3:
            del frame[rng.randrange(len(frame)) :]
        return bytes(frame)
    if kind == "bytes":
        return rng.randbytes(rng.randrange(200))
    if kind == "text":
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(50)))
    # A Tessera prefix whose header declares a length the frame does not have.
    return struct.pack(">3sBI", b"TSR", 1, rng.randrange(1 << 32)) + rng.randbytes(20)


# --- the attacks --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("authenticated", [False, True], ids=["before-auth", "after-auth"])
async def test_random_frames_get_errors_or_a_disconnect(
    server: CoordinatorServer,
    enrolled: tuple[str, Ed25519PrivateKey],
    tmp_path: Path,
    seed: int,
    authenticated: bool,
) -> None:
    rng = random.Random(seed)
    site_id, key = enrolled
    messages = corpus(rng, site_id)
    if authenticated:  # an open round: offers, resumes and declines reach the round's code
        plan = demo_plan(rounds=1, quorum=1, min_sites=1, round_deadline_s=300, input_size=32)
        run = server.fed.start_run(server.fed.add_plan(plan))
        messages = corpus(rng, site_id, run.run_id, run.model_digest)
    for _ in range(4):  # a few connections in a row: each gets disconnected in turn
        async with hostile(server.fed) as client:
            await until(lambda: bool(client.received))  # the challenge
            challenge = client.received[0]
            assert isinstance(challenge, Challenge)
            if authenticated:
                fields = signed.auth_fields(
                    nonce=challenge.nonce, site_id=site_id, fingerprint=server.fed.fingerprint()
                )
                auth = Authenticate(site_id=site_id, signature=sign(key, signed.AUTH, fields))
                await client.send(encode(auth))
                await until(lambda: any(isinstance(m, Welcome) for m in client.received))
            # Bursts of a few frames with a pause for the coordinator to read them: a kicked
            # connection with more than ``max_queue`` (16) frames unread lingers for
            # ``close_timeout`` (see ``Hostile.stop``), which is reported, not tested here.
            for _ in range(8):
                burst = [fuzz_frame(rng, messages) for _ in range(5)]
                if not all([await client.send(frame) for frame in burst]):
                    break
                await asyncio.sleep(0.02)
                if any(e.fatal for e in client.errors()):
                    break
            await asyncio.sleep(0.05)

            # Every answer is a valid frame (``Hostile`` decodes them) with a code; a fatal
            # error is the last thing the coordinator sends, and it drops the connection.
            errors = client.errors()
            assert all(e.code for e in errors)
            fatal = [e for e in errors if e.fatal]
            assert len(fatal) <= 1, fatal
            if fatal:
                assert fatal[0] is client.received[-1]
                assert fatal[0].code in {
                    "protocol.too_many_errors",
                    "identity.unknown_site",
                    "identity.invitation_unknown",
                    "crypto.bad_signature",
                }, fatal
                await until(lambda: site_id not in server.connections)
            elif authenticated:
                assert site_id in server.connections  # errors that are not strikes
    await assert_still_serves(server, tmp_path, f"After fuzz {seed}")
    assert (await signed_in(server.fed, site_id, key)).site_id == site_id


async def test_a_site_that_breaks_the_protocol_is_disconnected(
    server: CoordinatorServer, enrolled: tuple[str, Ed25519PrivateKey]
) -> None:
    """Five frames of garbage and the coordinator closes: errors, then one fatal error."""
    async with hostile(server.fed) as client:
        for _ in range(10):
            if not await client.send(b"\x00garbage"):
                break
        await client.wait_closed()

    codes = [(e.code, e.fatal) for e in client.errors()]
    assert codes == [("protocol.malformed", False)] * 4 + [("protocol.too_many_errors", True)]
    assert server.connections == {}


async def test_frames_beyond_the_size_limit_are_refused_unread(
    server: CoordinatorServer, tmp_path: Path
) -> None:
    too_big = LIMITS.max_frame_bytes + 1
    # A whole frame one byte too large.
    async with hostile(server.fed, max_size=None) as client:
        await client.send(b"\x00" * too_big)
        await client.wait_closed()
        assert client.close_code == 1009  # "message too big" (RFC 6455, section 7.4.1)
    # A frame header announcing 2**62 bytes: refused from the header, nothing is buffered.
    async with hostile(server.fed) as client:
        mask = b"\x01\x02\x03\x04"
        client.ws.transport.write(b"\x82\xff" + struct.pack(">Q", 1 << 62) + mask + b"\x00" * 64)
        await client.wait_closed()
        assert client.close_code == 1009
    # A deflate bomb: 16 MiB of zeros, a few kB on the wire. Where the coordinator accepts
    # permessage-deflate, the frame is refused as it inflates past the limit; where it
    # declines the extension, frames are limited by their size on the wire.
    async with hostile(server.fed, compression="deflate") as client:
        if client.ws.protocol.extensions:
            await client.send(b"\x00" * (16 << 20))
            await client.wait_closed()
            assert client.close_code == 1009
        else:
            assert client.ws.response is not None
            assert "Sec-WebSocket-Extensions" not in client.ws.response.headers
    await assert_still_serves(server, tmp_path, "After huge frames")


@pytest.mark.parametrize(
    "raw",
    [
        b"\x82\x05hello",  # an unmasked client frame
        b"\x8f\x80\x00\x00\x00\x00",  # a reserved opcode
        b"\xf2\x80\x00\x00\x00\x00",  # reserved bits without an extension that defines them
        b"\x09\xfe\x00\x7e\x00\x00\x00\x00" + b"\x00" * 126,  # a fragmented ping of 126 bytes
    ],
    ids=["unmasked", "opcode", "rsv-bits", "long-control"],
)
async def test_broken_websocket_framing_is_refused(
    server: CoordinatorServer, tmp_path: Path, raw: bytes
) -> None:
    async with hostile(server.fed) as client:
        client.ws.transport.write(raw)
        await client.wait_closed()
        assert client.close_code == 1002  # "protocol error" (RFC 6455, section 7.4.1)
    await assert_still_serves(server, tmp_path, "After broken framing")


async def test_half_open_connections_do_not_stop_real_sites(
    server: CoordinatorServer, enrolled: tuple[str, Ed25519PrivateKey], tmp_path: Path
) -> None:
    """Connections that stop at every stage of opening, all held open while real sites
    enrol and sign in."""
    port = server.port
    assert port is not None
    site_id, key = enrolled
    sockets: list[socket.socket] = []
    async with AsyncExitStack() as stack:
        for _ in range(20):  # TCP only: no TLS ClientHello, ever
            sockets.append(socket.create_connection(("127.0.0.1", port)))
        for _ in range(10):  # TLS done, no websocket upgrade request
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=pinned_client_ssl_context()
            )
            stack.callback(writer.close)
        for _ in range(5):  # a websocket upgrade request cut off half-way
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=pinned_client_ssl_context()
            )
            writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websock")
            stack.callback(writer.close)
        idle = [
            await stack.enter_async_context(hostile(server.fed)) for _ in range(20)
        ]  # got the challenge, never answer

        await assert_still_serves(server, tmp_path, "While half-open")
        assert (await signed_in(server.fed, site_id, key)).site_id == site_id
        assert all(isinstance(c.received[0], Challenge) for c in idle if c.received)
        assert not any(c.closed.is_set() for c in idle)  # well within the identify deadline
    for sock in sockets:
        sock.close()
    await assert_still_serves(server, tmp_path, "After half-open")


async def test_a_crowd_guessing_invitation_tokens_is_throttled(
    server: CoordinatorServer, tmp_path: Path
) -> None:
    """60 connections at once from one address (127.0.0.2), each guessing a token, while a
    real site enrols from another (127.0.0.1): the guesser gets 10 tries (the per-peer
    burst), then is refused before its tokens are even looked up; the real site is not
    slowed."""

    async def guess(n: int, token: str | None = None) -> list[ErrorMessage]:
        key = generate_signing_key()
        async with hostile(server.fed, local_addr=(GUESSER, 0)) as client:
            await until(lambda: bool(client.received))
            challenge = client.received[0]
            assert isinstance(challenge, Challenge)
            token, public_key = token or new_token(), public_key_b64(key)
            fields = signed.enrol_fields(
                nonce=challenge.nonce,
                token=token,
                public_key=public_key,
                site_name=f"Guess {n}",
                fingerprint=server.fed.fingerprint(),
            )
            await client.send(
                encode(
                    Enrol(
                        token=token,
                        site_name=f"Guess {n}",
                        public_key=public_key,
                        signature=sign(key, signed.ENROL, fields),
                    )
                )
            )
            await client.wait_closed()
            return client.errors()

    results = await asyncio.gather(
        *(guess(n) for n in range(60)), assert_still_serves(server, tmp_path, "Real")
    )

    codes = []
    for errors in results[:-1]:
        (error,) = errors
        assert error.fatal
        codes.append(error.code)
    assert sorted(codes) == ["identity.invitation_unknown"] * 10 + ["identity.throttled"] * 50
    # Throttled means not looked at: a valid code from the guesser's address is refused
    # too, and stays unused for the site it was meant for.
    code = server.fed.invite("Late")
    (error,) = await guess(99, token=decode_invitation(code).token)
    assert (error.code, error.fatal) == ("identity.throttled", True)
    assert [s.name for s in server.fed.store.sites()] == ["Real"]
    late = await enrol(code, SiteDir(tmp_path / "late"), "Late")
    assert server.fed.store.site(late.site_id) is not None


async def test_connections_that_do_not_identify_in_time_are_closed(tmp_path: Path) -> None:
    """Idle connections are closed at the identify deadline, a site that signed in stays;
    beyond the per-address budget of waiting connections a new one is refused at once."""
    limits = PeerLimits(identify_within_s=0.5, max_pending_per_peer=3)
    async with serving(tmp_path, limits) as server, AsyncExitStack() as stack:
        config = await enrol(server.fed.invite("Site"), SiteDir(tmp_path / "site"), "Site")
        key = load_private_key(SiteDir(tmp_path / "site").key_file)
        idle = [
            await stack.enter_async_context(hostile(server.fed, local_addr=(GUESSER, 0)))
            for _ in range(3)
        ]
        await until(lambda: all(c.received for c in idle))
        over = await stack.enter_async_context(hostile(server.fed, local_addr=(GUESSER, 0)))
        await over.wait_closed()
        assert [(e.code, e.fatal) for e in over.errors()] == [("net.busy", True)]
        assert server.pending.pending_from(GUESSER) == 3

        loop = asyncio.get_running_loop()
        opened = loop.time()
        await asyncio.gather(*(c.wait_closed() for c in idle))
        assert loop.time() - opened < 0.5 + 1.0  # closed at the deadline, not much later
        for client in idle:
            assert isinstance(client.received[0], Challenge)
            (error,) = client.errors()
            assert (error.code, error.fatal) == ("net.identify_timeout", True)
        assert server.pending.pending == 0
        # A site that signs in is no longer on the clock: still connected past the deadline.
        async with connect_pinned(server.fed.url(), server.fed.fingerprint()) as ws:
            session = SiteSession()
            session.receive_frame(await ws.recv())
            (event,) = session.events_received()
            assert isinstance(event, MessageReceived)
            assert isinstance(event.message, Challenge)
            fields = signed.auth_fields(
                nonce=event.message.nonce,
                site_id=config.site_id,
                fingerprint=server.fed.fingerprint(),
            )
            session.authenticate(site_id=config.site_id, signature=sign(key, signed.AUTH, fields))
            for frame in session.data_to_send():
                await ws.send(frame)
            await until(lambda: config.site_id in server.connections)
            await asyncio.sleep(1.0)
            assert config.site_id in server.connections
            assert ws.close_code is None


async def test_frames_before_sign_in_are_limited_to_64_kib(
    server: CoordinatorServer, enrolled: tuple[str, Ed25519PrivateKey]
) -> None:
    """A peer that has not identified cannot make the coordinator buffer a large frame; once
    signed in, frames up to the normal limit are read (this one is merely malformed)."""
    big = b"\x00" * (96 * 1024)
    assert len(big) < LIMITS.max_frame_bytes
    async with hostile(server.fed, max_size=None) as client:
        await until(lambda: bool(client.received))
        await client.send(big)
        await client.wait_closed()
        assert client.close_code == 1009
    site_id, key = enrolled
    async with hostile(server.fed) as client:
        await until(lambda: bool(client.received))
        challenge = client.received[0]
        assert isinstance(challenge, Challenge)
        fields = signed.auth_fields(
            nonce=challenge.nonce, site_id=site_id, fingerprint=server.fed.fingerprint()
        )
        await client.send(
            encode(Authenticate(site_id=site_id, signature=sign(key, signed.AUTH, fields)))
        )
        await until(lambda: any(isinstance(m, Welcome) for m in client.received))
        await client.send(big)
        await until(lambda: bool(client.errors()))
        assert [e.code for e in client.errors()] == ["protocol.malformed"]
        assert not client.closed.is_set()


async def test_a_fast_sender_is_slowed_not_dropped(tmp_path: Path) -> None:
    """25 messages at once against 20 per second with a burst of 5: all are answered, the
    last about a second later (back-pressure), and the connection stays open."""
    limits = PeerLimits(message_rate=Rate(per_s=20, burst=5))
    async with serving(tmp_path, limits) as server:
        config = await enrol(server.fed.invite("Fast"), SiteDir(tmp_path / "fast"), "Fast")
        key = load_private_key(SiteDir(tmp_path / "fast").key_file)
        async with hostile(server.fed) as client:
            await until(lambda: bool(client.received))
            challenge = client.received[0]
            assert isinstance(challenge, Challenge)
            fields = signed.auth_fields(
                nonce=challenge.nonce, site_id=config.site_id, fingerprint=server.fed.fingerprint()
            )
            auth = Authenticate(site_id=config.site_id, signature=sign(key, signed.AUTH, fields))
            await client.send(encode(auth))
            await until(lambda: any(isinstance(m, Welcome) for m in client.received))
            loop = asyncio.get_running_loop()
            started = loop.time()
            for _ in range(25):  # each answered "no such transfer", which is not a strike
                await client.send(encode(TransferAccept(transfer_id="nope", next_index=0)))
            await until(lambda: len(client.errors()) == 25)
            elapsed = loop.time() - started
            # The auth message took one token: 20 of the 25 wait, 1/20 s each.
            assert 0.9 <= elapsed < TIMEOUT, elapsed
            assert {e.code for e in client.errors()} == {"protocol.transfer_index"}
            assert not client.closed.is_set()
            assert config.site_id in server.connections
