"""The coordinator's websocket server over real TLS on loopback, driven by a hand-built site.

Nothing of ours is mocked: the real ``CoordinatorServer`` runs as a task in the test's event
loop on a fresh federation directory (real SQLite, real blob files, a real self-signed
certificate), sites enrol through ``site_client.core.enrolment.enrol`` with real invitation
codes, and a "rogue site" built from ``SiteSession``, ``connect_pinned`` and ``sign`` sends
whatever a test needs, well-formed or not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.localrun import free_port
from coordinator.server import CoordinatorServer
from coordinator.store import RunRecord
from shared.crypto.keys import generate_signing_key, load_private_key, public_key_b64
from shared.crypto.signing import sign, verify
from shared.crypto.tls import connect_pinned
from shared.errors import ConnectionFailed, InvitationError
from shared.identity.invitation import (
    Invitation,
    decode_invitation,
    encode_invitation,
    new_token,
    token_digest,
)
from shared.phases import COORDINATOR_PHASES, TIMINGS_FILE, read_timings
from shared.plan import TrainingPlan, demo_plan
from shared.protocol import signed
from shared.protocol.codec import Limits
from shared.protocol.messages import (
    Challenge,
    Chunk,
    ChunkAck,
    ErrorMessage,
    GovernanceNotice,
    Message,
    RoundDecline,
    RoundInvite,
    RunFinished,
    TransferAccept,
    TransferOffer,
    UpdateAccepted,
    UpdateOffer,
    Welcome,
)
from shared.protocol.session import (
    ChunkReceived,
    Closed,
    Event,
    MessageReceived,
    Phase,
    SiteSession,
    TransferComplete,
)
from shared.protocol.transfer import iter_chunks, make_offer
from shared.tensors import decode_tensors, encode_tensors
from site_client.core.config import SiteConfig, SiteDir
from site_client.core.enrolment import enrol

pytestmark = pytest.mark.timeout(20)  # a hang fails fast; each test normally takes < 1 s

M = TypeVar("M", bound=Message)
TIMEOUT = 4.0  # seconds to wait for any one frame
CHUNK = 64 * 1024  # small chunks, so the model and every update travel in several chunks
PLAN: dict[str, Any] = dict(rounds=1, quorum=1, min_sites=1, round_deadline_s=30, input_size=32)


# --- the coordinator --------------------------------------------------------------------


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CoordinatorServer]:
    fed = Federation.init(tmp_path / "coord", CoordinatorConfig(federation="Test", port=0))
    srv = CoordinatorServer(fed, limits=Limits(chunk_size=CHUNK), admin_poll_s=0.05)
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(srv.serve(ready=ready.set_result))
    try:
        started: set[asyncio.Future[Any]] = {task, ready}
        await asyncio.wait(started, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # serve() failed: show why
        assert ready.done(), "the server did not report its port"
        assert fed.paths.port_file.read_text() == str(ready.result()) == str(srv.port)
        yield srv
    finally:
        srv.stop()
        await asyncio.wait_for(task, TIMEOUT)
        for pending in list(srv._tasks):  # fire-and-forget flushes to closed sockets
            pending.cancel()
        fed.close()


@pytest.fixture
def fed(server: CoordinatorServer) -> Federation:
    return server.fed


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, so no one else takes it, not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def unreachable_invitation(port: int, *, expires_at: int) -> str:
    return encode_invitation(
        Invitation(
            coordinator_url=f"wss://127.0.0.1:{port}",
            fingerprint="ab" * 32,
            token=new_token(),
            federation="Test",
            expires_at=expires_at,
        )
    )


@dataclasses.dataclass
class EnrolledSite:
    config: SiteConfig
    key: Ed25519PrivateKey
    site_dir: SiteDir

    @property
    def site_id(self) -> str:
        return self.config.site_id


async def enrol_site(fed: Federation, root: Path, name: str) -> EnrolledSite:
    site_dir = SiteDir(root / name.replace(" ", "-"))
    config = await enrol(fed.invite(name), site_dir, name)
    return EnrolledSite(config, load_private_key(site_dir.key_file), site_dir)


@pytest.fixture
async def site(fed: Federation, tmp_path: Path) -> EnrolledSite:
    return await enrol_site(fed, tmp_path, "Site A")


# --- the rogue site ---------------------------------------------------------------------


class RogueSite:
    """A site driven by hand: the real ``SiteSession`` over a real pinned TLS websocket."""

    def __init__(self, ws: ClientConnection, fingerprint: str) -> None:
        self.ws = ws
        self.fingerprint = fingerprint
        self.session = SiteSession()
        self.closed: Closed | None = None
        self.notices: list[GovernanceNotice] = []
        self._events: list[Event] = []

    async def flush(self) -> None:
        for data in self.session.data_to_send():
            await self.ws.send(data)

    async def send(self, message: Message) -> None:
        self.session.send(message)
        await self.flush()

    async def next_event(self) -> Event:
        while not self._events:
            frame = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
            self.session.receive_frame(frame)
            self._events.extend(self.session.events_received())
            await self.flush()
        return self._events.pop(0)

    async def expect(self, kind: type[M] | tuple[type[M], ...]) -> M:
        """The next message, which must be a ``kind``; a ``Closed`` on the way is noted, and
        the governance notice every site gets after its welcome is kept unless asked for."""
        while True:
            event = await self.next_event()
            if isinstance(event, Closed):
                self.closed = event
            elif (
                isinstance(event, MessageReceived)
                and isinstance(event.message, GovernanceNotice)
                and not (isinstance(kind, type) and issubclass(kind, GovernanceNotice))
            ):
                self.notices.append(event.message)
            elif isinstance(event, MessageReceived):
                assert isinstance(event.message, kind), f"expected {kind}, got {event.message!r}"
                return event.message
            else:
                raise AssertionError(f"unexpected event {event!r}")

    async def expect_disconnect(self) -> None:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(self.ws.recv(), TIMEOUT)

    async def authenticate(self, site_id: str, key: Ed25519PrivateKey) -> None:
        assert self.session.nonce is not None
        fields = signed.auth_fields(
            nonce=self.session.nonce, site_id=site_id, fingerprint=self.fingerprint
        )
        self.session.authenticate(site_id=site_id, signature=sign(key, signed.AUTH, fields))
        await self.flush()

    async def download(self, offer: TransferOffer, have: bytes = b"") -> tuple[bytes, list[int]]:
        """Take (or resume) a chunked transfer, acking each chunk; returns the whole payload
        and the indices of the chunks that came."""
        received, indices = bytearray(have), []
        del received[self.session.expect_transfer(offer, have) * offer.chunk_size :]
        await self.flush()
        while True:
            event = await self.next_event()
            if isinstance(event, ChunkReceived):
                received += event.data
                indices.append(event.index)
                self.session.ack(event.transfer_id)
                await self.flush()
            elif isinstance(event, TransferComplete):
                assert event.offer == offer
                return bytes(received), indices
            elif isinstance(event, MessageReceived) and isinstance(event.message, GovernanceNotice):
                self.notices.append(event.message)  # a run started: pushed whenever it changes
            else:
                raise AssertionError(f"unexpected event during the download: {event!r}")


@asynccontextmanager
async def rogue(fed: Federation) -> AsyncIterator[RogueSite]:
    """A pinned connection to the coordinator whose challenge has arrived."""
    async with connect_pinned(fed.url(), fed.fingerprint(), open_timeout=TIMEOUT) as ws:
        site = RogueSite(ws, fed.fingerprint())
        challenge = await site.expect(Challenge)
        assert challenge.federation == "Test"
        yield site


def assert_error(
    msg: ErrorMessage, code: str, match: str, *, ref: str | None = None, fatal: bool = False
) -> None:
    assert msg.code == code, msg
    assert re.search(match, msg.message), msg.message
    assert (msg.ref, msg.fatal) == (ref, fatal), msg


# --- enrolment --------------------------------------------------------------------------


async def test_enrol_with_an_invitation_saves_the_site_identity(
    fed: Federation, tmp_path: Path
) -> None:
    site_dir = SiteDir(tmp_path / "site")
    config = await enrol(fed.invite("Site A"), site_dir, "Site A")

    assert site_dir.load() == config
    assert (config.site_name, config.federation) == ("Site A", "Test")
    assert (
        config.coordinator_url == fed.url() == f"wss://127.0.0.1:{fed.paths.port_file.read_text()}"
    )
    assert (config.fingerprint, config.coordinator_key) == (fed.fingerprint(), fed.public_key())
    assert site_dir.key_file.stat().st_mode & 0o777 == 0o600
    stored = fed.store.site(config.site_id)
    assert stored is not None and stored.name == "Site A"
    assert stored.public_key == public_key_b64(load_private_key(site_dir.key_file))


async def test_an_invitation_enrols_only_once(fed: Federation, tmp_path: Path) -> None:
    code = fed.invite("Site A")
    await enrol(code, SiteDir(tmp_path / "first"), "Site A")
    second = SiteDir(tmp_path / "second")

    with pytest.raises(InvitationError, match="already been used") as info:
        await enrol(code, second, "Site A")

    assert info.value.code == "identity.invitation_used"
    assert not second.is_enrolled() and not second.key_file.exists()
    assert len(fed.store.sites()) == 1


async def test_an_expired_invitation_is_refused_before_connecting(
    tmp_path: Path, closed_port: int
) -> None:
    # The address refuses connections: a site that tried would fail with net.unreachable.
    code = unreachable_invitation(closed_port, expires_at=int(time.time()) - 60)
    site_dir = SiteDir(tmp_path / "site")
    with pytest.raises(InvitationError, match="has expired") as info:
        await enrol(code, site_dir, "Late")

    assert info.value.code == "identity.invitation_expired"
    assert not site_dir.root.exists()


async def test_the_coordinator_also_refuses_an_expired_invitation(
    fed: Federation, tmp_path: Path
) -> None:
    # A site whose clock is behind does not see the expiry; the coordinator does.
    code = fed.invite("Late", hours=-1)
    with pytest.raises(InvitationError, match="has expired") as info:
        await enrol(code, SiteDir(tmp_path / "site"), "Late", now=time.time() - 7200)

    assert info.value.code == "identity.invitation_expired"
    assert fed.store.sites() == []


async def test_an_unknown_invitation_token_is_refused(fed: Federation, tmp_path: Path) -> None:
    forged = Invitation(
        coordinator_url=fed.url(),
        fingerprint=fed.fingerprint(),
        token=new_token(),
        federation="Test",
        expires_at=int(time.time()) + 3600,
    )
    with pytest.raises(InvitationError, match="not known to the coordinator") as info:
        await enrol(encode_invitation(forged), SiteDir(tmp_path / "site"), "Forger")

    assert info.value.code == "identity.invitation_unknown"
    assert fed.store.sites() == []


@pytest.mark.parametrize("code", ["TESSERA-1-NOTACODE", "hello", "TESSERA-1-"])
async def test_a_garbage_code_is_refused(tmp_path: Path, code: str) -> None:
    site_dir = SiteDir(tmp_path / "site")
    with pytest.raises(InvitationError, match="incomplete or mistyped") as info:
        await enrol(code, site_dir, "Site A")

    assert info.value.code == "identity.invitation_malformed"
    assert not site_dir.root.exists()


async def test_an_unreachable_coordinator_is_reported(tmp_path: Path, closed_port: int) -> None:
    code = unreachable_invitation(closed_port, expires_at=int(time.time()) + 3600)
    site_dir = SiteDir(tmp_path / "site")
    with pytest.raises(ConnectionFailed, match="Cannot reach the coordinator") as info:
        await enrol(code, site_dir, "Site A")

    assert info.value.code == "net.unreachable"
    assert not site_dir.is_enrolled() and not site_dir.key_file.exists()


async def test_a_certificate_pin_mismatch_sends_nothing(fed: Federation, tmp_path: Path) -> None:
    code = fed.invite("Site A")
    tampered = dataclasses.replace(
        decode_invitation(code), fingerprint=hashlib.sha256(b"another certificate").hexdigest()
    )
    site_dir = SiteDir(tmp_path / "site")

    with pytest.raises(ConnectionFailed, match="does not match the one in your invitation") as info:
        await enrol(encode_invitation(tampered), site_dir, "Site A")

    assert info.value.code == "net.pin_mismatch"
    assert not site_dir.is_enrolled() and not site_dir.key_file.exists()
    # The token never left the site: the genuine code still works.
    assert fed.store.sites() == []
    config = await enrol(code, site_dir, "Site A")
    assert fed.store.site(config.site_id) is not None


# --- authentication ---------------------------------------------------------------------


async def test_a_challenge_signed_with_the_wrong_key_is_refused_and_disconnected(
    server: CoordinatorServer, fed: Federation, site: EnrolledSite
) -> None:
    async with rogue(fed) as impostor:
        await impostor.authenticate(site.site_id, generate_signing_key())
        error = await impostor.expect(ErrorMessage)

        assert_error(error, "crypto.bad_signature", "signature does not verify", fatal=True)
        assert impostor.closed is not None and impostor.session.phase is Phase.CLOSED
        await impostor.expect_disconnect()
    assert site.site_id not in server.connections


async def test_an_unknown_site_is_refused_and_disconnected(
    server: CoordinatorServer, fed: Federation
) -> None:
    async with rogue(fed) as stranger:
        await stranger.authenticate("site-000000000000", generate_signing_key())
        error = await stranger.expect(ErrorMessage)

        assert_error(error, "identity.unknown_site", "not enrolled in the federation", fatal=True)
        await stranger.expect_disconnect()
    assert server.connections == {}


async def test_the_right_key_is_welcomed(
    server: CoordinatorServer, fed: Federation, site: EnrolledSite
) -> None:
    async with rogue(fed) as conn:
        await conn.authenticate(site.site_id, site.key)
        welcome = await conn.expect(Welcome)

        assert (welcome.site_id, welcome.site_name) == (site.site_id, "Site A")
        assert welcome.coordinator_key == fed.public_key()
        assert conn.session.phase is Phase.ESTABLISHED
        assert site.site_id in server.connections


# --- malformed frames -------------------------------------------------------------------

GARBAGE: list[tuple[bytes | str, str]] = [
    (b"garbage, not a frame", "not a Tessera frame"),
    (b"TSR", "shorter than its header"),
    (b"TSR\x01" + struct.pack(">I", 1000) + b"{}", "frame is truncated"),
    (b"TSR\x01" + struct.pack(">I", 8) + b"not json", "header is not valid JSON"),
]


@pytest.mark.parametrize("authenticated", [False, True], ids=["before-auth", "after-auth"])
async def test_garbage_frames_get_errors_then_a_disconnect(
    server: CoordinatorServer, fed: Federation, site: EnrolledSite, authenticated: bool
) -> None:
    async with rogue(fed) as conn:
        if authenticated:
            await conn.authenticate(site.site_id, site.key)
            await conn.expect(Welcome)
        for frame, match in GARBAGE:
            await conn.ws.send(frame)
            assert_error(await conn.expect(ErrorMessage), "protocol.malformed", match)

        await conn.ws.send("a text frame")  # the fifth strike
        error = await conn.expect(ErrorMessage)

        assert_error(error, "protocol.too_many_errors", "too many invalid messages", fatal=True)
        await conn.expect_disconnect()
    assert server.connections == {}
    # The server is still serving everyone else.
    async with rogue(fed) as other:
        await other.authenticate(site.site_id, site.key)
        await other.expect(Welcome)


# --- rounds -----------------------------------------------------------------------------


@dataclasses.dataclass
class Joined:
    """A rogue site that authenticated, was invited to round 1 and downloaded the model."""

    fed: Federation
    site: EnrolledSite
    conn: RogueSite
    invite: RoundInvite
    model_bytes: bytes

    @property
    def model(self) -> dict[str, np.ndarray]:
        return decode_tensors(self.model_bytes)

    @property
    def run_id(self) -> str:
        return self.invite.run_id


async def join(fed: Federation, site: EnrolledSite, conn: RogueSite) -> Joined:
    await conn.authenticate(site.site_id, site.key)
    welcome = await conn.expect(Welcome)
    invite = await conn.expect(RoundInvite)

    plan = TrainingPlan.from_dict(invite.plan)
    assert plan.plan_hash == invite.plan_hash and invite.round == 1
    assert invite.deadline_s == plan.round_deadline_s
    verify(
        welcome.coordinator_key,
        signed.PLAN,
        signed.plan_fields(plan_hash=invite.plan_hash),
        invite.plan_signature,
    )
    offer = invite.model_offer
    verify(
        welcome.coordinator_key,
        signed.MODEL,
        signed.model_fields(
            run_id=invite.run_id, round=1, plan_hash=invite.plan_hash, sha256=offer.sha256
        ),
        invite.model_signature,
    )
    data, indices = await conn.download(offer)
    assert indices == list(range(offer.total_chunks)) and offer.total_chunks > 1
    assert (
        hashlib.sha256(data).hexdigest()
        == offer.sha256
        == stored_run(fed, invite.run_id).model_digest
    )
    return Joined(fed, site, conn, invite, data)


def stored_run(fed: Federation, run_id: str) -> RunRecord:
    run = fed.store.run(run_id)
    assert run is not None
    return run


@pytest.fixture
def run_id(fed: Federation) -> str:
    return fed.start_run(fed.add_plan(demo_plan(**PLAN))).run_id


@pytest.fixture
async def joined(fed: Federation, site: EnrolledSite, run_id: str) -> AsyncIterator[Joined]:
    async with rogue(fed) as conn:
        yield await join(fed, site, conn)


def update_offer(
    j: Joined,
    data: bytes,
    transfer_id: str,
    *,
    num_samples: int = 10,
    key: Ed25519PrivateKey | None = None,
) -> tuple[UpdateOffer, TransferOffer]:
    offer = make_offer(transfer_id, data, CHUNK)
    fields = signed.update_fields(
        run_id=j.run_id,
        round=1,
        site_id=j.site.site_id,
        plan_hash=j.invite.plan_hash,
        base_model=j.invite.model_offer.sha256,
        sha256=offer.sha256,
        num_samples=num_samples,
    )
    message = UpdateOffer(
        run_id=j.run_id,
        round=1,
        base_model=j.invite.model_offer.sha256,
        update=offer.body(),
        num_samples=num_samples,
        train_loss=0.5,
        signature=sign(key or j.site.key, signed.UPDATE, fields),
    )
    return message, offer


async def upload(j: Joined, data: bytes, transfer_id: str, **kwargs: Any) -> Message:
    """Offer an update, send its chunks, and return the coordinator's verdict."""
    message, offer = update_offer(j, data, transfer_id, **kwargs)
    await j.conn.send(message)
    accept = await j.conn.expect(TransferAccept)
    assert (accept.transfer_id, accept.next_index) == (transfer_id, 0)
    j.conn.session.send_transfer(offer, data, 0)
    await j.conn.flush()
    acks = []
    while isinstance(verdict := await j.conn.expect(Message), ChunkAck):
        acks.append(verdict.next_index)
    assert acks == list(range(1, offer.total_chunks + 1))
    return verdict


def small_deltas(model: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (0.01 * rng.standard_normal(a.shape)).astype(np.float32) for name, a in model.items()
    }


def assert_nothing_kept(j: Joined, digest: str, code: str) -> None:
    rejected = j.fed.store.rejections(j.run_id)
    assert [(r["site_id"], r["round"], r["code"]) for r in rejected] == [(j.site.site_id, 1, code)]
    assert j.fed.store.updates(j.run_id, 1) == []
    assert not j.fed.blobs.has(digest)
    assert list(j.fed.blobs.partial.iterdir()) == []


def _with_nan(m: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    m["features.1.0.weight"].reshape(-1)[1234] = np.nan
    return m


def _with_inf(m: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    m["head.bias"][0] = np.inf
    return m


def _transposed(m: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    m["head.weight"] = np.ascontiguousarray(m["head.weight"].T)  # (64, 1): same size
    return m


def _missing(m: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    del m["head.bias"]
    return m


def _extra(m: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    m["backdoor.weight"] = np.zeros(4, np.float32)
    return m


def _float64(m: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    m["head.weight"] = m["head.weight"].astype(np.float64)
    return m


def _huge(m: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    m["head.weight"][0, 0] = 100.0
    return m


BAD_UPDATES: dict[str, tuple[Callable[[dict[str, np.ndarray]], Any], str, str]] = {
    "nan": (_with_nan, "update.nonfinite", "holds NaN values"),
    "inf": (_with_inf, "update.nonfinite", "holds infinite values"),
    "shape": (_transposed, "update.shape", r"has shape \(64, 1\).*global model's is \(1, 64\)"),
    "missing": (_missing, "update.keys", "is missing 1 tensor.*'head.bias'"),
    "extra": (_extra, "update.keys", "unexpected tensor.*'backdoor.weight'"),
    "dtype": (_float64, "update.dtype", "has dtype float64"),
    "range": (_huge, "update.range", "magnitude 100"),
    "garbage": (lambda m: b"not safetensors at all", "update.malformed", "malformed"),
}


@pytest.mark.parametrize("case", list(BAD_UPDATES))
async def test_an_invalid_update_is_rejected_logged_and_not_kept(joined: Joined, case: str) -> None:
    spoil, code, match = BAD_UPDATES[case]
    spoilt = spoil(small_deltas(joined.model, seed=1))
    data = spoilt if isinstance(spoilt, bytes) else encode_tensors(spoilt)

    verdict = await upload(joined, data, f"u-{case}")

    assert isinstance(verdict, ErrorMessage)
    assert_error(verdict, code, match, ref="update_offer")
    assert_nothing_kept(joined, hashlib.sha256(data).hexdigest(), code)
    row = joined.fed.store.round_row(joined.run_id, 1)
    assert row is not None and row["status"] == "open"


async def test_an_update_with_a_bad_signature_is_refused_before_its_upload(joined: Joined) -> None:
    data = encode_tensors(small_deltas(joined.model, seed=1))
    message, offer = update_offer(joined, data, "u-forged", key=generate_signing_key())

    await joined.conn.send(message)
    verdict = await joined.conn.expect(ErrorMessage)  # no TransferAccept: nothing is uploaded

    assert_error(verdict, "crypto.bad_signature", "signature does not verify", ref="update_offer")
    assert_nothing_kept(joined, offer.sha256, "crypto.bad_signature")


async def test_a_site_can_send_a_valid_update_after_a_rejected_one(joined: Joined) -> None:
    spoilt = _with_nan(small_deltas(joined.model, seed=2))
    rejected = await upload(joined, encode_tensors(spoilt), "u-first")
    assert isinstance(rejected, ErrorMessage) and rejected.code == "update.nonfinite"

    accepted = await upload(joined, encode_tensors(small_deltas(joined.model, seed=2)), "u-second")

    assert isinstance(accepted, UpdateAccepted)
    assert len(joined.fed.store.updates(joined.run_id, 1)) == 1
    await joined.conn.expect(RunFinished)


async def test_a_valid_update_is_stored_aggregated_and_the_run_finishes(joined: Joined) -> None:
    fed, run_id = joined.fed, joined.run_id
    base_digest = joined.invite.model_offer.sha256
    deltas = small_deltas(joined.model, seed=3)
    data = encode_tensors(deltas)
    digest = hashlib.sha256(data).hexdigest()

    verdict = await upload(joined, data, "u-valid", num_samples=17)

    assert verdict == UpdateAccepted(run_id=run_id, round=1, sha256=digest)
    (stored,) = fed.store.updates(run_id, 1)
    assert (stored.site_id, stored.digest, stored.num_samples) == (joined.site.site_id, digest, 17)
    assert fed.blobs.get(digest) == data
    assert list(fed.blobs.partial.iterdir()) == []

    finished = await joined.conn.expect(RunFinished)

    run = fed.store.run(run_id)
    assert run is not None and run.status == "finished" and run.current_round == 1
    assert (finished.run_id, finished.rounds, finished.final_model) == (
        run_id,
        1,
        run.model_digest,
    )
    # the final model is offered, signed, for the site's own validation
    assert finished.model_offer is not None and finished.model_offer.sha256 == run.model_digest
    verify(
        fed.public_key(),
        signed.FINAL_MODEL,
        signed.final_model_fields(
            run_id=run_id, rounds=1, plan_hash=finished.plan_hash, sha256=run.model_digest
        ),
        finished.model_signature,
    )
    row = fed.store.round_row(run_id, 1)
    assert row is not None and row["status"] == "closed" and row["n_updates"] == 1
    assert (row["model_in"], row["model_out"]) == (base_digest, run.model_digest)
    assert run.model_digest != base_digest
    new = decode_tensors(fed.blobs.get(run.model_digest))
    assert set(new) == set(joined.model)
    for name, before in joined.model.items():  # the weighted mean of one update is that update
        assert (new[name].shape, new[name].dtype) == (before.shape, before.dtype), name
        np.testing.assert_allclose(new[name], before + deltas[name], rtol=0, atol=1e-6)
    assert fed.store.rejections(run_id) == []

    # A replay (a site that reconnected and did not see the answer) gets the same answer...
    replay, _ = update_offer(joined, data, "u-valid", num_samples=17)
    await joined.conn.send(replay)
    assert await joined.conn.expect(UpdateAccepted) == verdict
    assert len(fed.store.updates(run_id, 1)) == 1
    # ...but another update for a round already answered is refused.
    other, _ = update_offer(joined, encode_tensors(small_deltas(joined.model, seed=4)), "u-other")
    await joined.conn.send(other)
    assert_error(
        await joined.conn.expect(ErrorMessage),
        "update.duplicate",
        "already accepted",
        ref="update_offer",
    )
    assert fed.store.updates(run_id, 1) == [stored]


async def test_two_sites_are_averaged_by_sample_count(
    server: CoordinatorServer, fed: Federation, tmp_path: Path, run_id: str
) -> None:
    sites = [await enrol_site(fed, tmp_path, name) for name in ("Site A", "Site B")]
    async with rogue(fed) as conn_a, rogue(fed) as conn_b:
        a = await join(fed, sites[0], conn_a)
        b = await join(fed, sites[1], conn_b)
        # one offer and one signature for the round's model, whoever downloads it
        assert a.invite.model_offer == b.invite.model_offer
        assert a.invite.model_signature == b.invite.model_signature
        deltas_a, deltas_b = small_deltas(a.model, seed=5), small_deltas(a.model, seed=6)

        assert isinstance(
            await upload(a, encode_tensors(deltas_a), "u-a", num_samples=30), UpdateAccepted
        )
        assert isinstance(
            await upload(b, encode_tensors(deltas_b), "u-b", num_samples=10), UpdateAccepted
        )
        final = (await conn_a.expect(RunFinished)).final_model
        assert (await conn_b.expect(RunFinished)).final_model == final

    new = decode_tensors(fed.blobs.get(final))
    for name, before in a.model.items():
        mean = (30 * deltas_a[name] + 10 * deltas_b[name]) / 40
        np.testing.assert_allclose(new[name], before + mean, rtol=0, atol=1e-6)
    # the round's phases, recorded when it was committed, in memory and in timings.jsonl
    (record,) = server.timings
    assert (record.side, record.run_id, record.round) == ("coordinator", run_id, 1)
    assert tuple(record.phases) == COORDINATOR_PHASES
    assert read_timings(fed.paths.root / TIMINGS_FILE) == [record]


async def test_a_declining_site_does_not_hold_up_the_round(
    fed: Federation, tmp_path: Path, run_id: str
) -> None:
    sites = [await enrol_site(fed, tmp_path, name) for name in ("Site A", "Site B")]
    async with rogue(fed) as conn_a, rogue(fed) as conn_b:
        a = await join(fed, sites[0], conn_a)
        await join(fed, sites[1], conn_b)
        await conn_b.send(
            RoundDecline(run_id=run_id, round=1, code="data.empty", reason="no studies yet")
        )
        assert isinstance(
            await upload(a, encode_tensors(small_deltas(a.model, 7)), "u-a"), UpdateAccepted
        )

        finished = await conn_b.expect(RunFinished)
        assert finished.final_model == (await conn_a.expect(RunFinished)).final_model
    assert [u.site_id for u in fed.store.updates(run_id, 1)] == [sites[0].site_id]


async def test_a_resume_index_beyond_the_model_gets_an_error(joined: Joined) -> None:
    model_id = joined.invite.model_offer.transfer_id
    await joined.conn.send(TransferAccept(transfer_id=model_id, next_index=999))

    assert_error(
        await joined.conn.expect(ErrorMessage),
        "protocol.transfer_index",
        r"resume index 999 is outside 0\.\.4",
        ref="transfer_accept",
    )
    # The connection is still usable: a valid resume gets the chunks from there on.
    have = joined.model_bytes[: 3 * CHUNK]
    data, indices = await joined.conn.download(joined.invite.model_offer, have)
    assert (data, indices) == (joined.model_bytes, [3])


async def test_an_update_corrupted_in_transit_is_rejected(joined: Joined) -> None:
    data = encode_tensors(small_deltas(joined.model, seed=1))
    message, offer = update_offer(joined, data, "u-corrupt")
    chunks = list(iter_chunks(offer, data))
    last = chunks[-1]
    chunks[-1] = Chunk(transfer_id=last.transfer_id, index=last.index, payload=last.payload[::-1])

    await joined.conn.send(message)
    await joined.conn.expect(TransferAccept)
    for chunk in chunks:
        joined.conn.session.send(chunk)
    await joined.conn.flush()
    acks = [(await joined.conn.expect(ChunkAck)).next_index for _ in chunks[1:]]

    assert acks == list(range(1, len(chunks)))
    hash_mismatch = "SHA-256 does not match its offer"
    assert_error(
        await joined.conn.expect(ErrorMessage), "protocol.hash_mismatch", hash_mismatch, ref="chunk"
    )
    assert_error(
        await joined.conn.expect(ErrorMessage),
        "protocol.hash_mismatch",
        hash_mismatch,
        ref="update_offer",
    )
    assert_nothing_kept(joined, offer.sha256, "protocol.hash_mismatch")


async def test_an_update_for_another_round_or_model_is_stale(joined: Joined) -> None:
    data = encode_tensors(small_deltas(joined.model, seed=1))
    message, _ = update_offer(joined, data, "u-stale")

    for stale in (
        dataclasses.replace(message, round=2),
        dataclasses.replace(message, base_model="0" * 64),
    ):
        await joined.conn.send(stale)
        assert_error(
            await joined.conn.expect(ErrorMessage),
            "update.stale",
            "is not the open round 1",
            ref="update_offer",
        )
    assert joined.fed.store.updates(joined.run_id, 1) == []
    assert joined.fed.store.rejections() == []  # stale is not misbehaviour: nothing to log


def _model(fed: Federation, run_id: str) -> dict[str, np.ndarray]:
    return decode_tensors(fed.blobs.get(stored_run(fed, run_id).model_digest))


async def test_an_interrupted_upload_resumes_at_the_last_acknowledged_chunk(
    server: CoordinatorServer, fed: Federation, site: EnrolledSite, run_id: str
) -> None:
    deltas = small_deltas(_model(fed, run_id), seed=8)
    data = encode_tensors(deltas)
    async with rogue(fed) as conn:
        first = await join(fed, site, conn)
        message, offer = update_offer(first, data, "u-resume")
        await conn.send(message)
        await conn.expect(TransferAccept)
        for chunk in list(iter_chunks(offer, data))[:2]:
            conn.session.send(chunk)
        await conn.flush()
        assert [(await conn.expect(ChunkAck)).next_index for _ in range(2)] == [1, 2]
    assert offer.total_chunks > 2

    async with rogue(fed) as conn:
        again = await join(fed, site, conn)  # invited again: the round still waits for it
        await conn.send(message)
        accept = await conn.expect(TransferAccept)
        assert (accept.transfer_id, accept.next_index) == ("u-resume", 2)
        conn.session.send_transfer(offer, data, 2)
        await conn.flush()
        acks = [(await conn.expect(ChunkAck)).next_index for _ in range(2, offer.total_chunks)]
        assert acks == list(range(3, offer.total_chunks + 1))
        assert await conn.expect(UpdateAccepted) == UpdateAccepted(
            run_id=run_id, round=1, sha256=offer.sha256
        )
        await conn.expect(RunFinished)
    assert again.invite.model_offer == first.invite.model_offer
    assert fed.blobs.get(offer.sha256) == data
    assert list(fed.blobs.partial.iterdir()) == []


async def test_a_site_online_before_the_run_starts_is_invited(
    fed: Federation, site: EnrolledSite
) -> None:
    async with rogue(fed) as conn:
        await conn.authenticate(site.site_id, site.key)
        await conn.expect(Welcome)
        run = fed.start_run(fed.add_plan(demo_plan(**PLAN)))

        invite = await conn.expect(RoundInvite)

        assert (invite.run_id, invite.round) == (run.run_id, 1)
        assert invite.model_offer.sha256 == run.model_digest


async def test_a_round_past_its_deadline_is_retried(fed: Federation, site: EnrolledSite) -> None:
    plan = demo_plan(**{**PLAN, "round_deadline_s": 0.3})
    run = fed.start_run(fed.add_plan(plan))
    async with rogue(fed) as conn:
        await join(fed, site, conn)  # ...and then never answers

        for _ in range(int(3 / 0.05)):
            row = fed.store.round_row(run.run_id, 1)
            if row is not None and row["status"] == "retrying":
                break
            await asyncio.sleep(0.05)

    assert row is not None and row["status"] == "retrying"
    (retry,) = fed.store.events("round_retry")
    assert re.search("0 of the quorum of 1 sites reported", retry["detail"]["reason"])
    assert stored_run(fed, run.run_id).status == "running"


async def test_a_restarted_coordinator_tells_a_site_the_last_run_is_over(tmp_path: Path) -> None:
    """The run finished just before the coordinator was killed, so no site heard it; after
    the restart no run is active, and a site connecting now is told (or would wait for
    ever for rounds that never come)."""
    config = CoordinatorConfig(federation="Test", host="127.0.0.1", port=free_port())
    fed = Federation.init(tmp_path / "coord", config)
    key = generate_signing_key()
    token = decode_invitation(fed.invite("Site A")).token
    site = fed.store.redeem_invitation(token_digest(token), public_key_b64(key), 1.0)
    run = fed.start_run(fed.add_plan(demo_plan(**PLAN)))
    fed.store.open_round(run.run_id, 1, [site.site_id], run.model_digest, 2.0, 60.0)
    fed.store.commit_round(run.run_id, 1, run.model_digest, 0, 0.5, True, 3.0)
    assert fed.store.active_run() is None
    srv = CoordinatorServer(fed, limits=Limits(chunk_size=CHUNK), admin_poll_s=0.05)
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(srv.serve(ready=ready.set_result))
    try:
        await asyncio.wait_for(ready, TIMEOUT)
        async with rogue(fed) as conn:
            await conn.authenticate(site.site_id, key)
            await conn.expect(Welcome)
            finished = await conn.expect(RunFinished)
            assert (finished.run_id, finished.rounds) == (run.run_id, 1)
            assert finished.final_model == fed.store.run(run.run_id).model_digest
    finally:
        srv.stop()
        await asyncio.wait_for(task, TIMEOUT)
        fed.close()
