"""Sans-I/O sessions: a coordinator/site pair wired in memory, no sockets."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import LocalProtocolError, TransferError
from shared.protocol import (
    Authenticate,
    Challenge,
    Chunk,
    ChunkAck,
    Enrol,
    ErrorMessage,
    Limits,
    Message,
    RoundInvite,
    RunFinished,
    TransferAccept,
    UpdateOffer,
    Welcome,
    decode,
    encode,
)
from shared.protocol.codec import DEFAULT_LIMITS
from shared.protocol.messages import MESSAGE_TYPES, TransferOffer
from shared.protocol.session import (
    ChunkReceived,
    Closed,
    CoordinatorSession,
    Event,
    MessageReceived,
    PeerViolation,
    Phase,
    SiteSession,
    TransferComplete,
    TransferFailed,
)
from shared.protocol.transfer import make_offer

NONCE = "n" * 43
HEX = "ab" * 32
Session = CoordinatorSession | SiteSession
M = TypeVar("M", bound=Message)


def deliver(src: Session, dst: Session) -> list[Event]:
    """Move every frame ``src`` queued into ``dst``; return the events ``dst`` produced."""
    for frame in src.data_to_send():
        dst.receive_frame(frame)
    return dst.events_received()


def messages(events: list[Event]) -> list[Message]:
    return [e.message for e in events if isinstance(e, MessageReceived)]


def codes(events: list[Event]) -> list[tuple[str, str]]:
    """(event type, code) of every violation, failure and close, in order."""
    return [
        (type(e).__name__, e.code)
        for e in events
        if isinstance(e, PeerViolation | TransferFailed | Closed)
    ]


def errors(events: list[Event]) -> list[ErrorMessage]:
    return [m for m in messages(events) if isinstance(m, ErrorMessage)]


def only_message(events: list[Event], cls: type[M]) -> M:
    (message,) = messages(events)
    assert isinstance(message, cls)
    return message


def new_pair(
    limits: Limits = DEFAULT_LIMITS, max_transfer: int = 1 << 31
) -> tuple[CoordinatorSession, SiteSession]:
    coordinator = CoordinatorSession(nonce=NONCE, federation="fed-1")
    site = SiteSession(limits=limits, max_transfer=max_transfer)
    challenge = only_message(deliver(coordinator, site), Challenge)
    assert challenge == Challenge(nonce=NONCE, federation="fed-1")
    assert site.nonce == NONCE
    return coordinator, site


def connect(
    limits: Limits = DEFAULT_LIMITS, max_transfer: int = 1 << 31
) -> tuple[CoordinatorSession, SiteSession]:
    coordinator, site = new_pair(limits, max_transfer)
    site.authenticate(site_id="site-1", signature="sig")
    assert site.phase is Phase.AWAIT_WELCOME
    auth = only_message(deliver(site, coordinator), Authenticate)
    assert auth.site_id == "site-1"
    coordinator.accept_identity(
        site_id="site-1", site_name="St Elsewhere", coordinator_key="ck", federation="fed-1"
    )
    welcome = only_message(deliver(coordinator, site), Welcome)
    assert welcome.site_name == "St Elsewhere"
    assert coordinator.phase is site.phase is Phase.ESTABLISHED
    assert coordinator.site_id == site.site_id == "site-1"
    return coordinator, site


def single_error(events: list[Event]) -> ErrorMessage:
    return only_message(events, ErrorMessage)


# --- connection set-up ------------------------------------------------------------------


def test_authenticate() -> None:
    coordinator, site = connect()
    assert coordinator.strikes == site.strikes == 0


def test_enrol() -> None:
    coordinator, site = new_pair()
    site.enrol(token="invite-token", site_name="St Elsewhere", public_key="pk", signature="sig")
    enrol = only_message(deliver(site, coordinator), Enrol)
    assert enrol.token == "invite-token"
    coordinator.accept_identity(
        site_id="site-9", site_name="St Elsewhere", coordinator_key="ck", federation="fed-1"
    )
    deliver(coordinator, site)
    assert site.phase is Phase.ESTABLISHED
    assert site.site_id == "site-9"


def test_reject() -> None:
    coordinator, site = new_pair()
    site.authenticate(site_id="site-1", signature="bad")
    deliver(site, coordinator)
    coordinator.reject("identity.authentication", "unknown site; ask for a new invitation")
    assert coordinator.closed
    assert coordinator.events_received() == [
        Closed("identity.authentication", "unknown site; ask for a new invitation")
    ]
    events = deliver(coordinator, site)
    error = single_error(events)
    assert error.fatal
    assert error.code == "identity.authentication"
    assert Closed("identity.authentication", error.message) in events
    assert site.phase is Phase.CLOSED
    # Nothing more goes out or comes in.
    site.send(ChunkAck(transfer_id="t", next_index=0))
    assert site.data_to_send() == []
    site.receive_frame(b"garbage")
    assert site.events_received() == []


def test_identify_only_once_and_after_the_challenge() -> None:
    site = SiteSession()
    with pytest.raises(LocalProtocolError, match="after the challenge") as info:
        site.authenticate(site_id="site-1", signature="sig")
    assert info.value.code == "protocol.local"
    _, site = new_pair()
    site.authenticate(site_id="site-1", signature="sig")
    with pytest.raises(LocalProtocolError, match="identify only once") as info:
        site.enrol(token="t", site_name="n", public_key="k", signature="s")
    assert info.value.code == "protocol.local"


def test_accept_identity_needs_an_identity() -> None:
    coordinator = CoordinatorSession(nonce=NONCE, federation="fed-1")
    with pytest.raises(LocalProtocolError, match="only after the site sent one") as info:
        coordinator.accept_identity(
            site_id="site-1", site_name="n", coordinator_key="ck", federation="fed-1"
        )
    assert info.value.code == "protocol.local"


def test_accept_identity_after_close_does_not_reopen() -> None:
    coordinator, site = new_pair()
    site.authenticate(site_id="site-1", signature="sig")
    deliver(site, coordinator)
    coordinator.data_to_send()
    # While the owner checks the identity, the session is closed (e.g. too many errors).
    coordinator.close("net.shutdown", "coordinator is shutting down")
    coordinator.data_to_send()
    coordinator.accept_identity(
        site_id="site-1", site_name="n", coordinator_key="ck", federation="fed-1"
    )
    assert coordinator.phase is Phase.CLOSED
    assert coordinator.data_to_send() == []


def test_site_giving_up_before_welcome_closes_the_coordinator() -> None:
    coordinator, site = new_pair()
    site.close("net.pin_mismatch", "coordinator certificate does not match the invitation")
    events = deliver(site, coordinator)
    assert coordinator.closed
    assert coordinator.strikes == 0
    assert Closed("net.pin_mismatch", "coordinator certificate does not match the invitation") in (
        events
    )


# --- violations -------------------------------------------------------------------------


def test_message_in_the_wrong_phase_is_answered_and_dropped() -> None:
    coordinator, site = new_pair()
    # Before identifying, the site offers an update.
    offer = make_offer("u", b"x", 1)
    site.send(
        UpdateOffer(
            run_id="r",
            round=1,
            base_model=HEX,
            update=offer.body(),
            num_samples=1,
            train_loss=0.1,
            signature="s",
        )
    )
    (event,) = deliver(site, coordinator)
    assert isinstance(event, PeerViolation)
    assert event.code == "protocol.unexpected"
    assert event.reason == "update_offer is not expected now (await_identity)"
    assert coordinator.phase is Phase.AWAIT_IDENTITY
    error = single_error(deliver(coordinator, site))
    assert (error.code, error.ref, error.fatal) == ("protocol.unexpected", "update_offer", False)
    # The connection goes on.
    site.authenticate(site_id="site-1", signature="sig")
    assert len(messages(deliver(site, coordinator))) == 1


def test_wrong_phase_after_established() -> None:
    coordinator, site = connect()
    coordinator.send(Challenge(nonce=NONCE, federation="fed-1"))
    events = deliver(coordinator, site)
    assert codes(events) == [("PeerViolation", "protocol.unexpected")]
    assert len(events) == 1
    error = single_error(deliver(site, coordinator))
    assert (error.code, error.ref) == ("protocol.unexpected", "challenge")
    # A message only the coordinator sends is refused from the site.
    site.send(Welcome(site_id="s", site_name="n", coordinator_key="k", federation="f"))
    events = deliver(site, coordinator)
    assert events == [
        PeerViolation("protocol.unexpected", "welcome is not expected now (established)")
    ]
    assert site.phase is coordinator.phase is Phase.ESTABLISHED


def test_second_identity_waits_for_the_verdict() -> None:
    coordinator, site = new_pair()
    site.authenticate(site_id="site-1", signature="sig")
    deliver(site, coordinator)
    coordinator.data_to_send()
    site.send(Authenticate(site_id="site-2", signature="sig"))
    site.send(ErrorMessage(code="site.busy", message="still here"))  # errors are always allowed
    events = deliver(site, coordinator)
    assert codes(events) == [("PeerViolation", "protocol.unexpected")]
    assert messages(events) == [ErrorMessage(code="site.busy", message="still here")]
    assert coordinator.phase is Phase.AWAIT_WELCOME


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"garbage", "protocol.malformed"),
        (b"TSR\x02\x00\x00\x00\x02{}", "protocol.version"),
        (b'TSR\x01\x00\x00\x00\x22{"type":"nope","id":"m","body":{}}', "protocol.unknown_type"),
        ("text frame", "protocol.malformed"),
    ],
)
def test_garbage_frames_are_answered(frame: bytes | str, code: str) -> None:
    coordinator, site = connect()
    site.receive_frame(frame)
    (event,) = site.events_received()
    assert isinstance(event, PeerViolation)
    assert event.code == code
    error = single_error(deliver(site, coordinator))
    assert (error.code, error.fatal) == (code, False)
    assert site.strikes == 1
    assert not site.closed


def test_text_frames_are_rejected() -> None:
    coordinator, _ = connect()
    coordinator.receive_frame(encode(ChunkAck(transfer_id="t", next_index=0)).decode("latin-1"))
    (event,) = coordinator.events_received()
    assert event == PeerViolation("protocol.malformed", "text frames are not allowed")


def test_too_many_strikes_close_the_session() -> None:
    coordinator = CoordinatorSession(nonce=NONCE, federation="fed-1", max_strikes=3)
    site = SiteSession()
    deliver(coordinator, site)
    for _ in range(3):
        coordinator.receive_frame(b"junk")
    events = coordinator.events_received()
    assert codes(events) == [("PeerViolation", "protocol.malformed")] * 3 + [
        ("Closed", "protocol.too_many_errors")
    ]
    assert len(events) == 4
    assert coordinator.closed
    coordinator.receive_frame(b"junk")  # ignored once closed
    assert coordinator.events_received() == []
    assert coordinator.strikes == 3
    site_events = deliver(coordinator, site)
    sent = errors(site_events)
    assert [(e.code, e.fatal) for e in sent] == [
        ("protocol.malformed", False),
        ("protocol.malformed", False),
        ("protocol.too_many_errors", True),
    ]
    assert site.closed
    assert Closed("protocol.too_many_errors", sent[-1].message) in site_events


# --- transfers --------------------------------------------------------------------------

MODEL = bytes(range(256)) * 40 + b"tail"  # 10244 bytes: chunks do not divide it
CHUNK = 1000


def invite(data: bytes, transfer_id: str = "model-r1") -> tuple[RoundInvite, TransferOffer]:
    offer = make_offer(transfer_id, data, CHUNK)
    message = RoundInvite(
        run_id="run-1",
        round=1,
        plan={"epochs": 1},
        plan_hash=HEX,
        plan_signature="ps",
        model=offer.body(),
        model_signature="ms",
        deadline_s=600.0,
    )
    return message, offer


def site_owner(site: SiteSession, frames: list[bytes], store: bytearray) -> list[Event]:
    """What the site's adapter does: feed frames, store each checked chunk, then ack."""
    seen: list[Event] = []
    for frame in frames:
        site.receive_frame(frame)
        for event in site.events_received():
            seen.append(event)
            if isinstance(event, ChunkReceived):
                store += event.data
                site.ack(event.transfer_id)
    return seen


def start_download(
    coordinator: CoordinatorSession, site: SiteSession, have: bytes = b""
) -> tuple[RoundInvite, int]:
    message, offer = invite(MODEL)
    coordinator.send(message)
    received = only_message(deliver(coordinator, site), RoundInvite)
    assert received == message
    next_index = site.expect_transfer(received.model_offer, have=have)
    accept = only_message(deliver(site, coordinator), TransferAccept)
    assert accept == TransferAccept(transfer_id="model-r1", next_index=next_index)
    coordinator.send_transfer(offer, MODEL, accept.next_index)
    return message, next_index


def test_full_model_download() -> None:
    coordinator, site = connect()
    message, start = start_download(coordinator, site)
    assert start == 0
    store = bytearray()
    events = site_owner(site, coordinator.data_to_send(), store)
    chunks = [e for e in events if isinstance(e, ChunkReceived)]
    assert [c.index for c in chunks] == list(range(11))
    assert [c.complete for c in chunks] == [False] * 10 + [True]
    assert events[-1] == TransferComplete(message.model_offer)
    assert bytes(store) == MODEL
    acks = messages(deliver(site, coordinator))
    assert acks == [ChunkAck(transfer_id="model-r1", next_index=i) for i in range(1, 12)]
    assert site._inbound == {}  # forgotten once the last chunk was acknowledged
    assert coordinator.strikes == site.strikes == 0


@pytest.mark.parametrize("partial", [0, 1, 999])
def test_download_resumed_on_a_new_connection(partial: int) -> None:
    coordinator, site = connect()
    start_download(coordinator, site)
    frames = coordinator.data_to_send()
    store = bytearray()
    site_owner(site, frames[:4], store)
    acks = messages(deliver(site, coordinator))
    last_ack = acks[-1]
    assert last_ack == ChunkAck(transfer_id="model-r1", next_index=4)
    # The connection drops mid-write: part of chunk 4 reached the disk, unacknowledged.
    store += frames[4][-CHUNK:][:partial]

    coordinator, site = connect()  # a NEW session pair
    _, start = start_download(coordinator, site, have=bytes(store))
    assert start == last_ack.next_index
    del store[start * CHUNK :]  # the adapter drops the partial chunk
    events = site_owner(site, coordinator.data_to_send(), store)
    assert [e.index for e in events if isinstance(e, ChunkReceived)] == list(range(4, 11))
    assert isinstance(events[-1], TransferComplete)
    assert bytes(store) == MODEL


def test_resume_with_everything_held_completes_at_once() -> None:
    coordinator, site = connect()
    _, offer = invite(MODEL)
    assert site.expect_transfer(offer, have=MODEL) == 11
    assert site.events_received() == [TransferComplete(offer)]
    accept = only_message(deliver(site, coordinator), TransferAccept)
    coordinator.send_transfer(offer, MODEL, accept.next_index)
    assert coordinator.data_to_send() == []


def test_corrupted_chunk_fails_the_transfer() -> None:
    coordinator, site = connect()
    start_download(coordinator, site)
    frames = coordinator.data_to_send()
    bad = bytearray(frames[5])
    bad[-1] ^= 0xFF  # the payload is the frame's tail
    frames[5] = bytes(bad)
    store = bytearray()
    events = site_owner(site, frames, store)
    failed = [e for e in events if isinstance(e, TransferFailed)]
    assert failed == [TransferFailed("model-r1", "protocol.hash_mismatch", failed[0].reason)]
    assert not any(isinstance(e, TransferComplete) for e in events)
    assert PeerViolation("protocol.hash_mismatch", failed[0].reason) in events
    sent = errors(deliver(site, coordinator))
    assert [(e.code, e.ref) for e in sent] == [("protocol.hash_mismatch", "chunk")]
    assert site._inbound == {}


def test_chunk_out_of_order_fails_the_transfer() -> None:
    coordinator, site = connect()
    start_download(coordinator, site)
    frames = coordinator.data_to_send()
    events = site_owner(site, [frames[0], frames[2]], bytearray())
    assert TransferFailed("model-r1", "protocol.transfer_index", "expected chunk 1, got 2") in (
        events
    )
    # The transfer is gone: further chunks are violations, not data.
    events = site_owner(site, [frames[1]], bytearray())
    assert events == [PeerViolation("protocol.transfer_index", "chunk for no open transfer")]
    sent = errors(deliver(site, coordinator))
    assert [e.code for e in sent] == [
        "protocol.transfer_index",
        "protocol.transfer_index",
    ]


def owner_hashing(site: SiteSession, frames: list[bytes], store: bytearray) -> list[Event]:
    """An adapter that hashes what it stores (``owner_hashes``) and acks the last chunk with
    its digest of the payload, draining the events that ack produces."""
    seen: list[Event] = []
    for frame in frames:
        site.receive_frame(frame)
        while events := site.events_received():
            for event in events:
                seen.append(event)
                if isinstance(event, ChunkReceived):
                    store += event.data
                    digest = hashlib.sha256(store).hexdigest() if event.complete else None
                    site.ack(event.transfer_id, sha256=digest)
    return seen


def test_owner_hashed_download_completes_with_the_last_ack() -> None:
    coordinator, site = connect()
    _, offer = invite(MODEL)
    site.expect_transfer(offer, owner_hashes=True)
    deliver(site, coordinator)
    coordinator.send_transfer(offer, MODEL, 0)
    store = bytearray()
    events = owner_hashing(site, coordinator.data_to_send(), store)
    chunks = [e for e in events if isinstance(e, ChunkReceived)]
    assert [c.index for c in chunks] == list(range(11))
    # Nothing completes on the last chunk itself: only once the owner gave its digest.
    assert events.index(TransferComplete(offer)) == len(events) - 1
    assert bytes(store) == MODEL and site._inbound == {}
    acks = messages(deliver(site, coordinator))
    assert acks == [ChunkAck(transfer_id="model-r1", next_index=i) for i in range(1, 12)]


def test_owner_hashed_download_resumes_and_rejects_a_wrong_digest() -> None:
    coordinator, site = connect()
    _, offer = invite(MODEL)
    held = MODEL[: 4 * CHUNK + 10]  # four whole chunks and a torn fifth
    assert site.expect_transfer(offer, have=held, owner_hashes=True) == 4
    deliver(site, coordinator)
    coordinator.send_transfer(offer, MODEL, 4)
    frames = coordinator.data_to_send()
    bad = bytearray(frames[-1])
    bad[-1] ^= 0xFF  # the owner stores (and hashes) a corrupted last chunk
    store = bytearray(MODEL[: 4 * CHUNK])
    events = owner_hashing(site, [*frames[:-1], bytes(bad)], store)
    failed = [e for e in events if isinstance(e, TransferFailed)]
    assert [f.code for f in failed] == ["protocol.hash_mismatch"]
    assert not any(isinstance(e, TransferComplete) for e in events)
    answers = deliver(site, coordinator)
    assert [e.code for e in errors(answers)] == ["protocol.hash_mismatch"]
    # The corrupted payload's last chunk is never acknowledged as stored.
    acks = [m for m in messages(answers) if isinstance(m, ChunkAck)]
    assert [a.next_index for a in acks] == list(range(5, 11))


def test_owner_hashed_transfer_needs_the_digest_with_its_last_ack() -> None:
    coordinator, site = connect()
    _, offer = invite(MODEL[:CHUNK])
    site.expect_transfer(offer, owner_hashes=True)
    deliver(site, coordinator)
    coordinator.send_transfer(offer, MODEL[:CHUNK], 0)
    (frame,) = coordinator.data_to_send()
    site.receive_frame(frame)
    (chunk,) = site.events_received()
    assert isinstance(chunk, ChunkReceived) and chunk.complete
    with pytest.raises(LocalProtocolError, match="pass its digest"):
        site.ack(chunk.transfer_id)


def test_owner_hashed_resume_with_everything_held_completes_at_once() -> None:
    _, site = connect()
    _, offer = invite(MODEL)
    assert site.expect_transfer(offer, have=MODEL, owner_hashes=True) == 11
    assert site.events_received() == [TransferComplete(offer)]


def test_chunk_for_no_transfer() -> None:
    coordinator, site = connect()
    coordinator.send(Chunk(transfer_id="nothing", index=0, payload=b"x"))
    events = deliver(coordinator, site)
    assert events == [PeerViolation("protocol.transfer_index", "chunk for no open transfer")]


def test_expect_transfer_refuses_oversized_offers() -> None:
    coordinator, site = connect(max_transfer=100)
    _, offer = invite(MODEL)
    with pytest.raises(TransferError, match="exceeds the limit of 100") as info:
        site.expect_transfer(offer)
    assert info.value.code == "protocol.too_large"
    error = single_error(deliver(site, coordinator))
    assert (error.code, error.ref) == ("protocol.too_large", "transfer_accept")


def test_expect_transfer_refuses_chunks_the_codec_would_refuse() -> None:
    coordinator, site = connect(limits=Limits(max_payload_bytes=CHUNK - 1))
    _, offer = invite(MODEL)
    with pytest.raises(TransferError, match="chunk size 1000 exceeds the limit") as info:
        site.expect_transfer(offer)
    assert info.value.code == "protocol.too_large"
    assert single_error(deliver(site, coordinator)).code == "protocol.too_large"


def test_update_upload_from_site_to_coordinator() -> None:
    coordinator, site = connect()
    update = b"u" * 2500
    offer = make_offer("update-r1-site-1", update, CHUNK)
    site.send(
        UpdateOffer(
            run_id="run-1",
            round=1,
            base_model=HEX,
            update=offer.body(),
            num_samples=12,
            train_loss=0.25,
            signature="s",
        )
    )
    received = only_message(deliver(site, coordinator), UpdateOffer)
    coordinator.expect_transfer(received.update_offer)
    accept = only_message(deliver(coordinator, site), TransferAccept)
    site.send_transfer(offer, update, accept.next_index)
    events = deliver(site, coordinator)
    assert isinstance(events[-1], TransferComplete)
    assert b"".join(e.data for e in events if isinstance(e, ChunkReceived)) == update
    assert list(site.chunks(offer, update, 2)) != []
    coordinator.send(RunFinished(run_id="run-1", rounds=1, final_model=HEX))
    assert isinstance(only_message(deliver(coordinator, site), RunFinished), RunFinished)


def test_schema_error_quoting_many_fields_does_not_crash_the_session() -> None:
    coordinator, site = connect()
    body = {f"{'k' * 60}{i}": 1 for i in range(200)}
    raw = json.dumps({"type": "chunk_ack", "id": "m", "body": body}).encode()
    site.receive_frame(struct.pack(">3sBI", b"TSR", 1, len(raw)) + raw)
    (event,) = site.events_received()
    assert isinstance(event, PeerViolation)
    assert event.code == "protocol.schema"
    assert "and 197 more" in event.reason
    assert single_error(deliver(site, coordinator)).code == "protocol.schema"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@given(
    frames=st.lists(
        st.binary(max_size=60)
        | st.text(max_size=10)
        | st.fixed_dictionaries(
            {
                "type": st.sampled_from(sorted(MESSAGE_TYPES)),
                "id": st.text(max_size=5),
                "body": st.dictionaries(st.text(max_size=12), json_values, max_size=4),
            }
        ).map(lambda h: json.dumps(h).encode())
        | st.binary(max_size=60).map(lambda b: struct.pack(">3sBI", b"TSR", 1, len(b)) + b),
        max_size=8,
    ),
    established=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_sessions_never_raise_on_peer_input(frames: list[bytes | str], established: bool) -> None:
    """Whatever arrives, a session answers or closes; it never raises."""
    if established:
        coordinator, site = connect()
    else:
        coordinator, site = CoordinatorSession(nonce=NONCE, federation="f"), SiteSession()
    for session in (coordinator, site):
        for frame in frames:
            if isinstance(frame, bytes) and frame.startswith(b"{"):
                frame = struct.pack(">3sBI", b"TSR", 1, len(frame)) + frame
            session.receive_frame(frame)
        session.events_received()
        assert session.strikes <= session.max_strikes
        for out in session.data_to_send():  # everything queued is a valid frame
            assert isinstance(decode(out), ErrorMessage | Challenge | Welcome)
