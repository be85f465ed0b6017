"""Floods and shared addresses against a live coordinator: the peer that floods is cut off,
the sites beside it are served.

As in ``test_server.py``: the real ``CoordinatorServer`` over real TLS on loopback with a
real federation directory; sites are driven by hand through the real ``SiteSession``. The
limits are made small (20 messages per second, a burst of 5, half a second of back-pressure
at most) so that a flood is cut off after a few dozen frames, and chunks are made small (4 KiB,
the free-chunk size here) so that a site's model download and update upload take far more
frames than that budget: they must not count as a flood.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.limits import PeerLimits, Rate
from coordinator.server import CoordinatorServer
from shared.crypto.keys import generate_signing_key, public_key_b64
from shared.crypto.signing import sign
from shared.identity.invitation import decode_invitation, new_token
from shared.plan import demo_plan
from shared.protocol import signed
from shared.protocol.codec import Limits, encode
from shared.protocol.messages import (
    Authenticate,
    Challenge,
    ChunkAck,
    Enrol,
    ErrorMessage,
    Message,
    TransferAccept,
    UpdateAccepted,
    UpdateOffer,
    Welcome,
)
from shared.protocol.transfer import make_offer
from shared.tensors import encode_tensors
from tests.coordinator.test_server import (
    PLAN,
    EnrolledSite,
    Joined,
    enrol_site,
    join,
    rogue,
    small_deltas,
)
from tests.coordinator.test_server_fuzz import (
    Hostile,
    hostile,
    no_handler_died,  # noqa: F401 (autouse fixture: no connection handler may die)
    until,
)

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 5.0
CHUNK = 4 * 1024
LIMITS = Limits(chunk_size=CHUNK)
FLOOD_LIMITS = PeerLimits(
    message_rate=Rate(per_s=20, burst=5), max_message_wait_s=0.5, free_chunk_bytes=CHUNK
)
NAT = "127.0.0.2"  # one address shared by several sites (Linux routes all of 127/8 to lo)


@asynccontextmanager
async def serving(tmp_path: Path, peer_limits: PeerLimits) -> AsyncIterator[CoordinatorServer]:
    fed = Federation.init(tmp_path / "coord", CoordinatorConfig(federation="Test", port=0))
    srv = CoordinatorServer(fed, limits=LIMITS, admin_poll_s=0.05, peer_limits=peer_limits)
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(srv.serve(ready=ready.set_result))
    try:
        started: set[asyncio.Future[Any]] = {task, ready}
        await asyncio.wait(started, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
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


async def sign_in(fed: Federation, client: Hostile, site_id: str, key: Ed25519PrivateKey) -> None:
    await until(lambda: bool(client.received))
    challenge = client.received[0]
    assert isinstance(challenge, Challenge)
    fields = signed.auth_fields(
        nonce=challenge.nonce, site_id=site_id, fingerprint=fed.fingerprint()
    )
    await client.send(
        encode(Authenticate(site_id=site_id, signature=sign(key, signed.AUTH, fields)))
    )
    await until(lambda: any(isinstance(m, (Welcome, ErrorMessage)) for m in client.received))


async def flood(client: Hostile, frame: bytes) -> int:
    """Send ``frame`` until the coordinator closes the connection; how many went out."""
    sent = 0
    while await client.send(frame):
        sent += 1
        await asyncio.sleep(0)  # the coordinator runs in this event loop too
    await client.wait_closed()
    return sent


async def upload_in_chunks(j: Joined, data: bytes) -> tuple[int, Message]:
    """Offer an update in ``CHUNK``-sized chunks, send them all at once, and return how many
    chunks that took and the coordinator's verdict."""
    offer = make_offer("u-big", data, CHUNK)
    fields = signed.update_fields(
        run_id=j.run_id,
        round=1,
        site_id=j.site.site_id,
        plan_hash=j.invite.plan_hash,
        base_model=j.invite.model_offer.sha256,
        sha256=offer.sha256,
        num_samples=10,
    )
    await j.conn.send(
        UpdateOffer(
            run_id=j.run_id,
            round=1,
            base_model=j.invite.model_offer.sha256,
            update=offer.body(),
            num_samples=10,
            train_loss=0.5,
            signature=sign(j.site.key, signed.UPDATE, fields),
        )
    )
    accept = await j.conn.expect(TransferAccept)
    assert (accept.transfer_id, accept.next_index) == ("u-big", 0)
    j.conn.session.send_transfer(offer, data, 0)
    await j.conn.flush()
    while isinstance(verdict := await j.conn.expect(Message), ChunkAck):
        pass
    return offer.total_chunks, verdict


@pytest.mark.parametrize("identified", [False, True], ids=["unidentified", "signed-in"])
async def test_a_flood_is_cut_off_while_a_site_completes_its_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, identified: bool
) -> None:
    """A peer sending valid messages flat out (an error report before sign-in, a request for
    a transfer that does not exist after) is disconnected with close code 1008 and the code
    ``protocol.rate``, and the coordinator logs it. Meanwhile a site downloads the model and
    uploads its update in many more frames than the flood was allowed, and is accepted."""
    caplog.set_level(logging.WARNING, logger="tessera.coordinator")
    async with serving(tmp_path, FLOOD_LIMITS) as server:
        fed = server.fed
        site = await enrol_site(fed, tmp_path, "Site A")
        flooder = await enrol_site(fed, tmp_path, "Flooder")
        fed.start_run(fed.add_plan(demo_plan(**PLAN)))
        async with hostile(fed) as client:
            if identified:
                await sign_in(fed, client, flooder.site_id, flooder.key)
                assert flooder.site_id in server.connections
                frame = encode(TransferAccept(transfer_id="nope", next_index=0))
            else:
                await until(lambda: bool(client.received))
                frame = encode(ErrorMessage(code="x.flood", message="flood"))

            async def exchange() -> tuple[Joined, int, Message]:
                async with rogue(fed) as conn:
                    j = await join(fed, site, conn)
                    data = encode_tensors(small_deltas(j.model, 1))
                    chunks, verdict = await upload_in_chunks(j, data)
                    return j, chunks, verdict

            sent, (joined, chunks, verdict) = await asyncio.gather(flood(client, frame), exchange())

        assert isinstance(verdict, UpdateAccepted)
        assert fed.store.updates(joined.run_id, 1)[0].site_id == site.site_id
        # The site's download and upload took many more frames than the flood's budget
        # (the burst and half a second at the rate): chunks and their acks are not messages.
        budget = 5 + 20 * 0.5
        assert chunks > 3 * budget and joined.invite.model_offer.total_chunks > 3 * budget
        # The flooder: cut off soon after its budget, told why, then closed with 1008.
        assert sent > budget
        if identified:  # each of its requests read was answered: the budget, little more
            answered = [e for e in client.errors() if e.code == "protocol.transfer_index"]
            assert budget / 2 <= len(answered) <= 3 * budget
        assert client.close_code == 1008
        assert client.ws.close_reason == "protocol.rate: too many messages"
        fatal = [e for e in client.errors() if e.fatal]
        assert [(e.code, e.message) for e in fatal] == [
            ("protocol.rate", "too many messages; disconnecting (the site reconnects by itself)")
        ]
        assert flooder.site_id not in server.connections
        warnings = [r.getMessage() for r in caplog.records if "protocol.rate" in r.getMessage()]
        who = flooder.site_id if identified else "an unidentified peer"
        assert warnings == [
            f"disconnecting {who} (127.0.0.1): too many messages; disconnecting (the site "
            "reconnects by itself) (protocol.rate)"
        ]


async def test_small_chunks_still_count_as_messages(tmp_path: Path) -> None:
    """An offer cut into chunks below the free size cannot flood for free: the upload is
    cut off like any other flood."""
    async with serving(tmp_path, FLOOD_LIMITS) as server:
        fed = server.fed
        site = await enrol_site(fed, tmp_path, "Site A")
        fed.start_run(fed.add_plan(demo_plan(**PLAN)))
        async with rogue(fed) as conn:
            j = await join(fed, site, conn)
            data = encode_tensors(small_deltas(j.model, 1))
            offer = make_offer("u-tiny", data, 256)
            fields = signed.update_fields(
                run_id=j.run_id,
                round=1,
                site_id=site.site_id,
                plan_hash=j.invite.plan_hash,
                base_model=j.invite.model_offer.sha256,
                sha256=offer.sha256,
                num_samples=10,
            )
            await conn.send(
                UpdateOffer(
                    run_id=j.run_id,
                    round=1,
                    base_model=j.invite.model_offer.sha256,
                    update=offer.body(),
                    num_samples=10,
                    train_loss=0.5,
                    signature=sign(site.key, signed.UPDATE, fields),
                )
            )
            await conn.expect(TransferAccept)
            for frame in conn.session.chunks(offer, data, 0):
                try:
                    await conn.ws.send(frame)
                except Exception:  # closed under us: the point of the test
                    break
                await asyncio.sleep(0)
            await until(lambda: conn.ws.close_code is not None)
            assert conn.ws.close_code == 1008
        assert fed.store.updates(j.run_id, 1) == []


async def test_a_guesser_behind_a_shared_address_locks_no_enrolled_site_out(
    tmp_path: Path,
) -> None:
    """Three enrolled sites and a token guesser behind one NAT address. Once the guesser has
    used up the address's failures, and those of everyone, its guesses (even a valid code)
    are refused unread; the enrolled sites still sign in from that address, and a site that
    fails to sign in (a wrong key) does not use up the address's budget either."""
    limits = PeerLimits(
        identity_per_peer=Rate(per_s=1 / 600, burst=3),
        identity_overall=Rate(per_s=1 / 600, burst=5),
    )
    async with serving(tmp_path, limits) as server:
        fed = server.fed
        sites: list[EnrolledSite] = [
            await enrol_site(fed, tmp_path, f"Behind NAT {n}") for n in range(3)
        ]

        async def enrol_attempt(address: str, token: str) -> ErrorMessage:
            key = generate_signing_key()
            async with hostile(fed, local_addr=(address, 0)) as client:
                await until(lambda: bool(client.received))
                challenge = client.received[0]
                assert isinstance(challenge, Challenge)
                fields = signed.enrol_fields(
                    nonce=challenge.nonce,
                    token=token,
                    public_key=public_key_b64(key),
                    site_name="Guess",
                    fingerprint=fed.fingerprint(),
                )
                enrol = Enrol(
                    token=token,
                    site_name="Guess",
                    public_key=public_key_b64(key),
                    signature=sign(key, signed.ENROL, fields),
                )
                await client.send(encode(enrol))
                await client.wait_closed()
                (error,) = client.errors()
                return error

        codes = [(await enrol_attempt(NAT, new_token())).code for _ in range(5)]
        assert codes == ["identity.invitation_unknown"] * 3 + ["identity.throttled"] * 2
        # Failures elsewhere use up the overall budget too.
        codes = [(await enrol_attempt("127.0.0.3", new_token())).code for _ in range(3)]
        assert codes == ["identity.invitation_unknown"] * 2 + ["identity.throttled"]
        valid = decode_invitation(fed.invite("Late")).token
        assert (await enrol_attempt(NAT, valid)).code == "identity.throttled"

        # A site with the wrong key fails as often as it likes, and costs the address nothing.
        for _ in range(5):
            async with hostile(fed, local_addr=(NAT, 0)) as client:
                await sign_in(fed, client, sites[0].site_id, generate_signing_key())
                (error,) = client.errors()
                assert (error.code, error.fatal) == ("crypto.bad_signature", True)

        for site in sites:
            async with hostile(fed, local_addr=(NAT, 0)) as client:
                await sign_in(fed, client, site.site_id, site.key)
                assert not client.errors()
                assert site.site_id in server.connections
        assert server.identity_guard.check(NAT, server.clock()).code == "identity.throttled"
