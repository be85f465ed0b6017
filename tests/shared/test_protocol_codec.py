"""Codec: round trip of every message type, rejection codes, and "decode raises only ours"."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import LocalProtocolError, RemoteProtocolError
from shared.protocol import (
    PROTOCOL_VERSION,
    Authenticate,
    Challenge,
    CharterSignature,
    Chunk,
    ChunkAck,
    DataSummaryReport,
    Dispute,
    Enrol,
    ErrorMessage,
    GovernanceNotice,
    HeadRequest,
    HeadUpdate,
    Limits,
    MaskedUpdateOffer,
    Message,
    PlanDecision,
    ReleaseAcceptance,
    ReleaseNotice,
    RoundDecline,
    RoundInvite,
    RunFinished,
    SecAggKeys,
    SecAggSetup,
    SecAggShares,
    SecAggUnmask,
    SecAggUnmaskResponse,
    TransferAccept,
    TransferOffer,
    UpdateAccepted,
    UpdateOffer,
    ValidationReport,
    Welcome,
    decode,
    encode,
)
from shared.protocol.messages import MESSAGE_TYPES

from .test_protocol_he_messages import HE_STRATEGIES

DECODE_CODES = {
    "protocol.malformed",
    "protocol.version",
    "protocol.too_large",
    "protocol.unknown_type",
    "protocol.schema",
}
HEX = "ab" * 32
OFFER = {"transfer_id": "model-1", "size": 10, "sha256": HEX, "chunk_size": 4}


def frame(header: bytes | dict[str, Any], payload: bytes = b"", *, version: int = 1) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack(">3sBI", b"TSR", version, len(raw)) + raw + payload


def header_of(message: Message) -> dict[str, Any]:
    return {"type": message.TYPE, "id": "m", "body": message.body()}


def with_body(message: Message, **changes: Any) -> dict[str, Any]:
    header = header_of(message)
    header["body"].update(changes)
    return header


# --- strategies: valid messages ---------------------------------------------------------

idents = st.from_regex(r"[A-Za-z0-9_.:\-]{1,24}", fullmatch=True)
hex64 = st.binary(min_size=32, max_size=32).map(bytes.hex)
texts = st.text(max_size=40)  # unicode, including astral-plane characters


def sized_text(lo: int, hi: int) -> st.SearchStrategy[str]:
    return st.text(min_size=lo, max_size=hi)


finite = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=10,
)
offers = st.builds(
    TransferOffer,
    transfer_id=idents,
    size=st.integers(0, 1 << 40),
    sha256=hex64,
    chunk_size=st.integers(1, 1 << 24),
).map(TransferOffer.body)
rounds = st.integers(1, 10_000)

STRATEGIES: dict[type[Message], st.SearchStrategy[Message]] = {
    Challenge: st.builds(Challenge, nonce=sized_text(16, 128), federation=texts),
    Enrol: st.builds(
        Enrol,
        token=sized_text(1, 256),
        site_name=sized_text(1, 200),
        public_key=sized_text(1, 128),
        signature=texts,
    ),
    Authenticate: st.builds(Authenticate, site_id=idents, signature=texts),
    Welcome: st.builds(
        Welcome, site_id=idents, site_name=texts, coordinator_key=texts, federation=texts
    ),
    ErrorMessage: st.builds(
        ErrorMessage,
        code=sized_text(1, 64),
        message=texts,
        ref=st.none() | texts,
        fatal=st.booleans(),
    ),
    TransferAccept: st.builds(TransferAccept, transfer_id=idents, next_index=st.integers(0)),
    Chunk: st.builds(
        Chunk, transfer_id=idents, index=st.integers(0), payload=st.binary(max_size=64)
    ),
    ChunkAck: st.builds(ChunkAck, transfer_id=idents, next_index=st.integers(0)),
    RoundInvite: st.builds(
        RoundInvite,
        run_id=idents,
        round=rounds,
        plan=st.dictionaries(texts, json_values, max_size=4),
        plan_hash=hex64,
        plan_signature=texts,
        model=offers,
        model_signature=texts,
        deadline_s=st.floats(0, 1e9, exclude_min=True) | st.integers(1, 10**6),
    ),
    UpdateOffer: st.builds(
        UpdateOffer,
        run_id=idents,
        round=rounds,
        base_model=hex64,
        update=offers,
        num_samples=st.integers(1, 10**9),
        train_loss=finite,
        signature=texts,
    ),
    UpdateAccepted: st.builds(UpdateAccepted, run_id=idents, round=rounds, sha256=hex64),
    RoundDecline: st.builds(
        RoundDecline, run_id=idents, round=rounds, code=sized_text(1, 64), reason=texts
    ),
    RunFinished: st.builds(
        RunFinished, run_id=idents, rounds=st.integers(0, 10_000), final_model=hex64
    ),
}
_names = st.text(min_size=1, max_size=64)
_counts = st.integers(0, 10**6)
_tables = st.dictionaries(_names, _counts, max_size=5)
STRATEGIES[DataSummaryReport] = st.builds(
    DataSummaryReport,
    summary=st.fixed_dictionaries(
        {
            **{k: _counts for k in ("images", "patients", "studies", "series", "rejected_files")},
            **{
                k: _tables
                for k in (
                    "by_modality",
                    "by_scanner",
                    "by_image_size",
                    "by_pixel_spacing",
                    "by_bits_stored",
                    "by_photometric",
                )
            },
            "by_label": st.dictionaries(_names, _tables, max_size=3),
        }
    ),
)

persons = sized_text(1, 60)
plan_items = st.fixed_dictionaries(
    {
        "plan": st.dictionaries(texts, json_values, max_size=3),
        "plan_hash": hex64,
        "plan_signature": texts,
        "decision": st.sampled_from(["pending", "approve", "refuse"]),
    }
)
STRATEGIES[GovernanceNotice] = st.builds(
    GovernanceNotice,
    charter_version=st.integers(1, 1000),
    charter_sha256=hex64,
    charter_signature=texts,
    charter_text=texts,
    charter_signed=st.booleans(),
    plans=st.lists(plan_items, max_size=3),
)
STRATEGIES[CharterSignature] = st.builds(
    CharterSignature, version=st.integers(1, 1000), sha256=hex64, person=persons, signature=texts
)
STRATEGIES[PlanDecision] = st.builds(
    PlanDecision,
    plan_hash=hex64,
    decision=st.just("refuse"),
    reason=sized_text(1, 100).filter(str.strip),
    person=persons,
    signature=texts,
)
STRATEGIES[ValidationReport] = st.builds(
    ValidationReport,
    run_id=idents,
    round=st.integers(0, 10_000),
    model=hex64,
    metrics=st.fixed_dictionaries(
        {
            **{
                m: finite | st.none()
                for m in ("auc", "accuracy", "sensitivity", "specificity", "loss")
            },
            "n": st.integers(1, 1 << 30),
        }
    ),
    signature=texts,
)
STRATEGIES[HeadRequest] = st.builds(
    HeadRequest,
    known_size=st.integers(0, 1 << 40),
    updates=st.lists(st.fixed_dictionaries({"run_id": idents, "round": rounds}), max_size=3),
)
STRATEGIES[HeadUpdate] = st.builds(
    HeadUpdate,
    head=st.dictionaries(texts, json_values, max_size=3),
    known_size=st.integers(0, 1 << 40),
    consistency=st.lists(hex64, max_size=4),
    inclusions=st.lists(
        st.fixed_dictionaries(
            {
                "entry": st.dictionaries(texts, json_values, max_size=3),
                "proof": st.lists(hex64, max_size=3),
            }
        ),
        max_size=2,
    ),
)

STRATEGIES[Dispute] = st.builds(
    Dispute,
    dispute_id=idents,
    subject=st.just("round"),
    run_id=idents,
    round=rounds,
    release=st.just(""),
    reason=sized_text(1, 100).filter(str.strip),
    person=persons,
    signature=texts,
)

versions = st.builds("{}.{}".format, st.integers(0, 999), st.integers(0, 999))
STRATEGIES[ReleaseNotice] = st.builds(
    ReleaseNotice,
    releases=st.lists(
        st.fixed_dictionaries({"version": versions, "run_id": idents, "offer": offers}),
        max_size=3,
    ),
)
STRATEGIES[ReleaseAcceptance] = st.builds(
    ReleaseAcceptance,
    version=versions,
    run_id=idents,
    weights_sha256=hex64,
    accepted=st.just(True),
    metrics=st.just({})
    | st.fixed_dictionaries(
        {
            **{
                m: finite | st.none()
                for m in ("auc", "accuracy", "sensitivity", "specificity", "loss")
            },
            "n": st.integers(1, 1 << 30),
        }
    ),
    reason=sized_text(0, 100),
    person=persons,
    signature=texts,
)

# Secure aggregation: the envelopes carry shared.privacy.secagg messages as their fields.
_secagg_base = {
    "run_id": texts,
    "round": st.integers(0, 10_000),
    "config_digest": hex64,
    "signature": texts,
}
_shares = st.builds(
    lambda x, y, t: {"x": x, "y": format(y, "x"), "t": t},
    st.integers(1, 255),
    st.integers(0, (1 << 256) - 1),
    st.integers(1, 255),
)


@st.composite
def _setups(draw: st.DrawFn) -> SecAggSetup:
    sites = draw(st.lists(idents, min_size=2, max_size=5, unique=True))
    n = len(sites)
    return SecAggSetup(
        run_id=draw(idents),
        round=draw(rounds),
        config={
            "run_id": draw(idents),
            "round": draw(rounds),
            "sites": sites,
            "threshold": draw(st.integers(n // 2 + 1, n)),
            "vector_length": draw(st.integers(1, 1 << 30)),
            "bits": draw(st.sampled_from([32, 64])),
            "clip_norm": draw(st.floats(0.01, 1e6)),
            "max_sites": draw(st.integers(n, 64)),
        },
        site_keys={s: draw(sized_text(1, 64)) for s in sites},
        signature=draw(texts),
    )


STRATEGIES[SecAggSetup] = _setups()
STRATEGIES[SecAggKeys] = st.builds(
    SecAggKeys,
    run_id=idents,
    round=rounds,
    advertisements=st.lists(
        st.fixed_dictionaries(
            {**_secagg_base, "site": texts, "cipher_public": texts, "mask_public": texts}
        ),
        max_size=3,
    ),
)
STRATEGIES[SecAggShares] = st.builds(
    SecAggShares,
    run_id=idents,
    round=rounds,
    shares=st.lists(
        st.fixed_dictionaries(
            {
                **_secagg_base,
                "sender": texts,
                "recipient": texts,
                "ciphertext": texts,
                "self_mask_commitment": hex64,
            }
        ),
        max_size=3,
    ),
)
STRATEGIES[MaskedUpdateOffer] = st.builds(
    MaskedUpdateOffer,
    run_id=idents,
    round=rounds,
    masked=st.fixed_dictionaries({**_secagg_base, "site": texts, "digest": hex64}),
    update=offers,
    num_samples=st.integers(1, 10**9),
    train_loss=finite,
)
STRATEGIES[SecAggUnmask] = st.builds(
    SecAggUnmask,
    run_id=idents,
    round=rounds,
    request=st.fixed_dictionaries(
        {
            **_secagg_base,
            "survivors": st.lists(idents, max_size=4),
            "dropped": st.lists(idents, max_size=2),
        }
    ),
)
STRATEGIES[SecAggUnmaskResponse] = st.builds(
    SecAggUnmaskResponse,
    run_id=idents,
    round=rounds,
    response=st.fixed_dictionaries(
        {
            **_secagg_base,
            "site": texts,
            "self_mask_shares": st.lists(st.tuples(idents, _shares).map(list), max_size=3),
            "mask_key_shares": st.lists(st.tuples(idents, _shares).map(list), max_size=2),
        }
    ),
)

STRATEGIES.update(HE_STRATEGIES)
messages = st.one_of(*STRATEGIES.values())


def test_every_message_type_has_a_strategy() -> None:
    assert set(STRATEGIES) == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda cls: cls.TYPE)
@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_round_trip(cls: type[Message], data: st.DataObject) -> None:
    message = data.draw(STRATEGIES[cls])
    frame_bytes = encode(message)
    assert decode(frame_bytes) == message
    assert decode(bytearray(frame_bytes)) == message
    assert decode(memoryview(frame_bytes)) == message


def test_golden_bytes() -> None:
    ack = encode(ChunkAck(transfer_id="t1", next_index=3), message_id="m1")
    assert ack == (
        b'TSR\x01\x00\x00\x00I{"type":"chunk_ack","id":"m1",'
        b'"body":{"transfer_id":"t1","next_index":3}}'
    )
    chunk = encode(Chunk(transfer_id="t1", index=2, payload=b"\x00\xffab"), message_id="m2")
    assert chunk == (
        b'TSR\x01\x00\x00\x00@{"type":"chunk","id":"m2","body":{"transfer_id":"t1","index":2}}'
        b"\x00\xffab"
    )
    error = encode(ErrorMessage(code="x.y", message="h\u00e9llo \u2713"), message_id="m3")
    assert error == (
        b'TSR\x01\x00\x00\x00g{"type":"error","id":"m3","body":{"code":"x.y",'
        b'"message":"h\\u00e9llo \\u2713","ref":null,"fatal":false}}'
    )
    assert PROTOCOL_VERSION == 1


def test_message_ids_are_fresh_unless_given() -> None:
    ack = ChunkAck(transfer_id="t1", next_index=0)
    assert encode(ack) != encode(ack)
    assert encode(ack, message_id="x") == encode(ack, message_id="x")


# --- malformed frames -------------------------------------------------------------------


def assert_rejected(data: bytes, code: str, match: str, limits: Limits | None = None) -> None:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        decode(data) if limits is None else decode(data, limits)
    assert info.value.code == code


GOOD = header_of(ChunkAck(transfer_id="t1", next_index=0))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "shorter than its header"),
        (b"TSR\x01\x00\x00", "shorter than its header"),
        (b"XYZ\x01\x00\x00\x00\x02{}", "not a Tessera frame"),
        (b"tsr\x01\x00\x00\x00\x02{}", "not a Tessera frame"),
        (b"TSR\x01\x00\x00\x00\x10{}", "truncated"),
        (frame(json.dumps(GOOD).encode())[:-1], "truncated"),
        (frame(b"{not json"), "not valid JSON"),
        (frame(b""), "not valid JSON"),
        (frame(b"\xff\xfe{}"), "not valid JSON"),
        (
            frame(b'{"type":"chunk_ack","id":"m","body":{"transfer_id":"t","next_index":NaN}}'),
            "JSON",
        ),
        (frame(b'{"a":Infinity}'), "not valid JSON"),
        (frame(b"[1, 2]"), "wrong shape"),
        (frame(b'"chunk_ack"'), "wrong shape"),
        (frame(b"null"), "wrong shape"),
        (frame({**GOOD, "extra": 1}), "wrong shape"),
        (frame({"type": "chunk_ack", "id": "m"}), "wrong shape"),
        (frame({"type": "chunk_ack", "body": {}}), "wrong shape"),
        (frame({**GOOD, "type": 7}), "wrong shape"),
        (frame({**GOOD, "id": None}), "wrong shape"),
        (frame({**GOOD, "body": []}), "wrong shape"),
    ],
)
def test_malformed_frames(data: bytes, match: str) -> None:
    assert_rejected(data, "protocol.malformed", match)


def test_out_of_range_float_is_rejected() -> None:
    # 1e999 parses to infinity, which could never be encoded again.
    invite = RoundInvite(
        run_id="r",
        round=1,
        plan={},
        plan_hash=HEX,
        plan_signature="s",
        model=OFFER,
        model_signature="s",
        deadline_s=5.0,
    )
    raw = json.dumps(header_of(invite)).encode().replace(b"5.0", b"1e999")
    assert_rejected(frame(raw), "protocol.malformed", "not valid JSON")
    nested = json.dumps(with_body(invite, plan={"lr": 5.0})).encode()
    assert_rejected(frame(nested.replace(b"5.0", b"-1e999")), "protocol.malformed", "JSON")


@pytest.mark.parametrize("name", ["nope", "", "transfer_offer", "Chunk", "__class__"])
def test_unknown_type(name: str) -> None:
    assert_rejected(
        frame({"type": name, "id": "m", "body": {}}), "protocol.unknown_type", "unknown message"
    )


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version(version: int) -> None:
    data = frame(GOOD, version=version)
    assert_rejected(data, "protocol.version", f"version {version} is not supported")


def test_size_limits() -> None:
    limits = Limits(max_header_bytes=100, max_payload_bytes=8)
    fits = Chunk(transfer_id="t", index=0, payload=b"x" * 8)
    assert decode(encode(fits), limits) == fits
    too_big = Chunk(transfer_id="t", index=0, payload=b"x" * 9)
    assert_rejected(encode(too_big), "protocol.too_large", "payload is too large", limits)
    long_header = ErrorMessage(code="c", message="m" * 100)
    assert_rejected(encode(long_header), "protocol.too_large", "header is too large", limits)
    # A huge declared header length is refused before the (missing) bytes are awaited.
    lying = struct.pack(">3sBI", b"TSR", 1, 2**32 - 1) + b"{}"
    assert_rejected(lying, "protocol.too_large", "header is too large", limits)
    assert_rejected(lying, "protocol.too_large", "header is too large")


# --- schema -----------------------------------------------------------------------------

ACK = ChunkAck(transfer_id="t1", next_index=0)
CHUNK = Chunk(transfer_id="t1", index=0, payload=b"abc")
UPDATE = UpdateOffer(
    run_id="run-1",
    round=1,
    base_model=HEX,
    update=OFFER,
    num_samples=3,
    train_loss=0.5,
    signature="sig",
)
INVITE = RoundInvite(
    run_id="run-1",
    round=2,
    plan={"lr": 0.1},
    plan_hash=HEX,
    plan_signature="s",
    model=OFFER,
    model_signature="s",
    deadline_s=60.0,
)


def _without(message: Message, key: str) -> dict[str, Any]:
    header = header_of(message)
    del header["body"][key]
    return header


@pytest.mark.parametrize(
    ("header", "payload", "match"),
    [
        (_without(ACK, "next_index"), b"", r"\['next_index'\] are missing or not allowed"),
        (with_body(ACK, extra=1), b"", r"\['extra'\] are missing or not allowed"),
        (with_body(CHUNK, payload="abc"), b"abc", "not allowed"),
        (with_body(ACK, next_index="0"), b"", "next_index has the wrong type"),
        (with_body(ACK, next_index=True), b"", "next_index has the wrong type"),
        (with_body(ACK, next_index=1.0), b"", "next_index has the wrong type"),
        (with_body(ACK, next_index=None), b"", "next_index has the wrong type"),
        (with_body(ACK, transfer_id=7), b"", "transfer_id has the wrong type"),
        (with_body(CHUNK, index=-1), b"abc", "index must be >= 0"),
        (with_body(ACK, next_index=-5), b"", "next_index must be >= 0"),
        (with_body(ACK, transfer_id="a b"), b"", "transfer_id must be"),
        (with_body(ACK, transfer_id="t1\n"), b"", "transfer_id must be"),
        (with_body(ACK, transfer_id=""), b"", "transfer_id must be"),
        (with_body(ACK, transfer_id="x" * 129), b"", "transfer_id must be"),
        (header_of(ACK), b"payload", "carries no binary payload"),
        (with_body(UPDATE, train_loss=True), b"", "train_loss has the wrong type"),
        (with_body(UPDATE, train_loss="0.5"), b"", "train_loss has the wrong type"),
        (with_body(UPDATE, train_loss=10**400), b"", "train_loss has the wrong type"),
        (with_body(UPDATE, base_model=HEX.upper()), b"", "lower-case hex SHA-256"),
        (with_body(UPDATE, base_model=HEX[:-1]), b"", "lower-case hex SHA-256"),
        (with_body(UPDATE, base_model=HEX + "\n"), b"", "lower-case hex SHA-256"),
        (with_body(UPDATE, base_model=HEX + "00"), b"", "lower-case hex SHA-256"),
        (with_body(UPDATE, num_samples=0), b"", "num_samples must be >= 1"),
        (with_body(UPDATE, update=[]), b"", "update has the wrong type"),
        (with_body(UPDATE, update={**OFFER, "sha256": "zz"}), b"", "transfer sha256"),
        (with_body(UPDATE, update={**OFFER, "size": -1}), b"", "size must be >= 0"),
        (with_body(UPDATE, update={**OFFER, "chunk_size": 0}), b"", "chunk_size must be > 0"),
        (with_body(UPDATE, update={**OFFER, "size": True}), b"", "size has the wrong type"),
        (with_body(UPDATE, update={**OFFER, "x": 1}), b"", r"\['x'\] are missing"),
        (with_body(INVITE, model={}), b"", "are missing or not allowed"),
        (with_body(INVITE, round=0), b"", "round must be >= 1"),
        (with_body(INVITE, deadline_s=0), b"", "deadline_s must be > 0"),
        (with_body(INVITE, plan=[1]), b"", "plan has the wrong type"),
        (with_body(ErrorMessage(code="c", message="m"), fatal=0), b"", "fatal has the wrong"),
        (with_body(ErrorMessage(code="c", message="m"), ref=1), b"", "ref has the wrong type"),
        (with_body(ErrorMessage(code="c", message="m"), code=""), b"", "code has the wrong"),
        (with_body(Challenge(nonce="n" * 16, federation="f"), nonce="short"), b"", "nonce"),
        (
            with_body(UpdateAccepted(run_id="r", round=1, sha256=HEX), round=-1),
            b"",
            "round must be >= 1",
        ),
        (
            with_body(RunFinished(run_id="r", rounds=1, final_model=HEX), run_id="../x"),
            b"",
            "run_id must be",
        ),
    ],
)
def test_schema_violations(header: dict[str, Any], payload: bytes, match: str) -> None:
    assert_rejected(frame(header, payload), "protocol.schema", match)


def test_invalid_messages_cannot_be_built() -> None:
    with pytest.raises(RemoteProtocolError, match="index must be >= 0") as info:
        Chunk(transfer_id="t", index=-1)
    assert info.value.code == "protocol.schema"
    with pytest.raises(RemoteProtocolError, match="hex SHA-256") as info:
        UpdateAccepted(run_id="r", round=1, sha256="A" * 64)
    assert info.value.code == "protocol.schema"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_float_cannot_be_encoded(bad: float) -> None:
    message = UpdateOffer(
        run_id="r",
        round=1,
        base_model=HEX,
        update=OFFER,
        num_samples=1,
        train_loss=bad,
        signature="s",
    )
    with pytest.raises(LocalProtocolError, match="cannot encode update_offer") as info:
        encode(message)
    assert info.value.code == "protocol.local"
    with pytest.raises(LocalProtocolError, match="cannot encode round_invite") as info:
        encode(with_plan(bad))
    assert info.value.code == "protocol.local"


def with_plan(value: float) -> RoundInvite:
    return RoundInvite(
        run_id="r",
        round=1,
        plan={"lr": value},
        plan_hash=HEX,
        plan_signature="s",
        model=OFFER,
        model_signature="s",
        deadline_s=1.0,
    )


# --- decode raises only RemoteProtocolError ---------------------------------------------


def decode_or_reject(data: bytes, limits: Limits | None = None) -> None:
    try:
        message = decode(data) if limits is None else decode(data, limits)
    except RemoteProtocolError as exc:
        assert exc.code in DECODE_CODES
        assert type(exc) is RemoteProtocolError
    else:
        assert isinstance(message, Message)
        assert decode(encode(message)) == message  # what decodes can be re-encoded


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_decode_arbitrary_bytes(data: bytes) -> None:
    decode_or_reject(data)
    decode_or_reject(b"TSR" + data)
    decode_or_reject(b"TSR\x01" + data)


@given(header=st.binary(max_size=200), payload=st.binary(max_size=20))
@settings(max_examples=300, deadline=None)
def test_decode_valid_prefix_arbitrary_header(header: bytes, payload: bytes) -> None:
    decode_or_reject(frame(header, payload))
    decode_or_reject(frame(header, payload), Limits(max_header_bytes=50, max_payload_bytes=10))


json_objects = st.dictionaries(texts, json_values, max_size=5)
type_names = st.sampled_from(sorted(MESSAGE_TYPES)) | texts


@given(
    header=json_objects
    | st.fixed_dictionaries(
        {"type": type_names, "id": texts, "body": json_objects},
        optional={"extra": json_values},
    ),
    payload=st.binary(max_size=10),
)
@settings(max_examples=300, deadline=None)
def test_decode_arbitrary_json_header(header: dict[str, Any], payload: bytes) -> None:
    decode_or_reject(frame(header, payload))


@given(message=messages, data=st.data())
@settings(max_examples=300, deadline=None)
def test_decode_mutated_valid_messages(message: Message, data: st.DataObject) -> None:
    """A valid message with one body field swapped for an arbitrary JSON value."""
    header = header_of(message)
    key = data.draw(st.sampled_from(sorted(header["body"])))
    header["body"][key] = data.draw(json_values)
    decode_or_reject(frame(header, message.payload_bytes))
    # Nested offers too.
    for name in ("model", "update"):
        if name in header["body"] and isinstance(header["body"][name], dict):
            offer = dict(header["body"][name])
            sub = data.draw(st.sampled_from(sorted(offer) or ["x"]))
            offer[sub] = data.draw(json_values)
            header["body"][name] = offer
            decode_or_reject(frame(header))


def test_deeply_nested_header_is_rejected() -> None:
    deep = b'{"type":"round_invite","id":"m","body":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_rejected(frame(deep), "protocol.malformed", "not valid JSON")


def _summary(**changes: object) -> dict:
    base: dict = {k: 0 for k in ("images", "patients", "studies", "series", "rejected_files")}
    base.update(
        {
            k: {}
            for k in (
                "by_modality",
                "by_scanner",
                "by_image_size",
                "by_pixel_spacing",
                "by_bits_stored",
                "by_photometric",
            )
        }
    )
    base["by_label"] = {}
    base.update(changes)
    return base


@pytest.mark.parametrize(
    ("summary", "why"),
    [
        (_summary(patient_names=["DOE^JANE"]), "not allowed"),
        (_summary(images=-1), "non-negative integer"),
        (_summary(images=True), "non-negative integer"),
        (_summary(by_scanner={"x" * 65: 1}), "longer than 64"),
        (_summary(by_modality={"CT": "12"}), "non-negative integer"),
        (_summary(by_label={"label": {"1": 2.5}}), "non-negative integer"),
        (_summary(by_modality={str(i): 1 for i in range(201)}), "at most 200"),
        ([], "must be an object"),
    ],
)
def test_a_data_summary_is_counts_only(summary: object, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why) as info:
        DataSummaryReport(summary=summary)  # type: ignore[arg-type]
    assert info.value.code == "protocol.schema"
    assert DataSummaryReport(summary=_summary(by_modality={"CR": 3})).summary["by_modality"]


_SETUP = SecAggSetup(
    run_id="run",
    round=1,
    config={
        "run_id": "run:1",
        "round": 1,
        "sites": ["a", "b", "c"],
        "threshold": 2,
        "vector_length": 10,
        "bits": 32,
        "clip_norm": 1.0,
        "max_sites": 3,
    },
    site_keys={"a": "ka", "b": "kb", "c": "kc"},
    signature="s",
)


@pytest.mark.parametrize(
    ("message", "field", "value", "match"),
    [
        (
            SecAggKeys(run_id="r", round=1, advertisements=[]),
            "advertisements",
            [{"site": "a"}],
            "advertisement is malformed",
        ),
        (
            SecAggUnmask(
                run_id="r",
                round=1,
                request={
                    "run_id": "r",
                    "round": 1,
                    "config_digest": "d",
                    "signature": "s",
                    "survivors": ["a"],
                    "dropped": [],
                },
            ),
            "request",
            {"survivors": 3},
            "request is malformed",
        ),
        (_SETUP, "round", 0, "round must be >= 1"),
    ],
)
def test_secure_aggregation_envelopes_refuse_malformed_contents(
    message: Message, field: str, value: Any, match: str
) -> None:
    assert decode(encode(message)) == message
    with pytest.raises(RemoteProtocolError, match=match) as info:
        decode(frame({"type": message.TYPE, "id": "m", "body": {**message.body(), field: value}}))
    assert info.value.code == "protocol.schema"


def test_a_secure_aggregation_setup_with_a_threshold_below_a_majority_is_refused() -> None:
    config = {**_SETUP.config, "sites": ["a", "b", "c", "d"], "threshold": 2, "max_sites": 4}
    body = {**_SETUP.body(), "config": config}
    with pytest.raises(RemoteProtocolError, match="threshold must be from 3") as info:
        decode(frame({"type": "secagg_setup", "id": "m", "body": body}))
    assert info.value.code == "protocol.schema"
