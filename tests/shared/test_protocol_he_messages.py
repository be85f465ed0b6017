"""The CKKS key-distribution messages: round trips through the codec, bounds, sessions.

``HE_STRATEGIES`` is self-contained so that ``test_protocol_codec.STRATEGIES`` can take it in
(its completeness test lists every registered message type).
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.crypto.keys import b64url_encode
from shared.errors import RemoteProtocolError
from shared.protocol.codec import Limits, decode, encode
from shared.protocol.messages import (
    MESSAGE_TYPES,
    HEKeyAck,
    HEKeyDirectory,
    HEKeyRequest,
    HEPublicKey,
    HESealedKey,
    Message,
)
from shared.protocol.session import CoordinatorSession, Phase, SiteSession

KEY = b64url_encode(bytes(range(32)))
SIG = "s" * 86
HEX = hashlib.sha256(b"public context").hexdigest()

_ids = st.from_regex(r"[A-Za-z0-9_.:\-]{1,24}", fullmatch=True)
_keys = st.binary(min_size=32, max_size=32).map(b64url_encode)
_sigs = st.text(min_size=1, max_size=128)


@st.composite
def _requests(draw: st.DrawFn) -> HEKeyRequest:
    sites = draw(st.dictionaries(_ids, _keys, min_size=2, max_size=6))
    return HEKeyRequest(
        run_id=draw(_ids),
        attempt=draw(_ids),
        key_site=draw(st.sampled_from(sorted(sites))),
        site_keys=sites,
        signature=draw(_sigs),
    )


@st.composite
def _directories(draw: st.DrawFn) -> HEKeyDirectory:
    run_id, attempt = draw(_ids), draw(_ids)
    sites = draw(st.lists(_ids, min_size=1, max_size=5, unique=True))
    keys = [
        HEPublicKey(
            run_id=run_id,
            attempt=attempt,
            site_id=s,
            public_key=draw(_keys),
            signature=draw(_sigs),
        ).body()
        for s in sites
    ]
    return HEKeyDirectory(run_id=run_id, attempt=attempt, keys=keys)


HE_STRATEGIES: dict[type[Message], st.SearchStrategy[Message]] = {
    HEKeyRequest: _requests(),
    HEPublicKey: st.builds(
        HEPublicKey, run_id=_ids, attempt=_ids, site_id=_ids, public_key=_keys, signature=_sigs
    ),
    HEKeyDirectory: _directories(),
    HESealedKey: st.builds(
        HESealedKey,
        run_id=_ids,
        attempt=_ids,
        recipient=_ids,
        key_site_public=_keys,
        public_context=st.binary(min_size=1, max_size=300).map(b64url_encode),
        key_id=st.binary(min_size=32, max_size=32).map(bytes.hex),
        signature=_sigs,
        payload=st.binary(min_size=1, max_size=2000),
    ),
    HEKeyAck: st.builds(
        HEKeyAck,
        run_id=_ids,
        attempt=_ids,
        site_id=_ids,
        public_context_sha256=st.binary(min_size=32, max_size=32).map(bytes.hex),
        key_id=st.binary(min_size=32, max_size=32).map(bytes.hex),
        signature=_sigs,
    ),
}


def test_every_he_message_is_registered() -> None:
    assert {cls.TYPE for cls in HE_STRATEGIES} <= set(MESSAGE_TYPES)
    assert {
        "he_key_request",
        "he_public_key",
        "he_key_directory",
        "he_sealed_key",
        "he_key_ack",
    } == {cls.TYPE for cls in HE_STRATEGIES}


@pytest.mark.parametrize("cls", list(HE_STRATEGIES), ids=lambda cls: cls.TYPE)
@given(data=st.data())
@settings(max_examples=25, deadline=None)
def test_round_trip(cls: type[Message], data: st.DataObject) -> None:
    message = data.draw(HE_STRATEGIES[cls])
    assert decode(encode(message)) == message


def sealed(**changes: Any) -> HESealedKey:
    fields: dict[str, Any] = {
        "run_id": "run-1",
        "attempt": "a1",
        "recipient": "site-b",
        "key_site_public": KEY,
        "public_context": b64url_encode(b"\x01" * 100),
        "key_id": HEX,
        "signature": SIG,
        "payload": b"\x02" * 600_000,
    }
    return HESealedKey(**{**fields, **changes})


def test_a_sealed_key_travels_as_the_binary_payload_not_in_the_header() -> None:
    msg = sealed()
    frame = encode(msg)
    assert len(frame) - len(msg.payload) < 1000  # the JSON header stays small
    back = decode(frame)
    assert isinstance(back, HESealedKey) and type(back.payload) is bytes
    assert back == msg and back.payload == msg.payload
    assert back.public_context_bytes == b"\x01" * 100 and back.key_site_public_bytes == bytes(
        range(32)
    )


def schema_error(match: str) -> Any:
    return pytest.raises(RemoteProtocolError, match=match)


def test_request_bounds() -> None:
    ok = {"run_id": "run-1", "attempt": "a1", "key_site": "a", "signature": SIG}
    with schema_error(match="2-256 sites") as info:
        HEKeyRequest(**ok, site_keys={"a": KEY})
    assert info.value.code == "protocol.schema"
    with schema_error(match="2-256 sites"):
        HEKeyRequest(**ok, site_keys={f"s{i}": KEY for i in range(257)} | {"a": KEY})
    with schema_error(match="32-byte key"):
        HEKeyRequest(**ok, site_keys={"a": KEY, "b": KEY[:-1]})
    with schema_error(match="32-byte key"):
        HEKeyRequest(**ok, site_keys={"a": KEY, "b": 7})
    with schema_error(match="site id"):
        HEKeyRequest(**ok, site_keys={"a": KEY, "b c": KEY})
    with schema_error(match="key_site must be one of the sites"):
        HEKeyRequest(**{**ok, "key_site": "z"}, site_keys={"a": KEY, "b": KEY})
    with schema_error(match="signature has the wrong length"):
        HEKeyRequest(**{**ok, "signature": "x" * 129}, site_keys={"a": KEY, "b": KEY})


def test_public_key_and_ack_bounds() -> None:
    ok = {"run_id": "run-1", "attempt": "a1", "site_id": "b", "signature": SIG}
    with schema_error(match="32-byte key"):
        HEPublicKey(**ok, public_key=b64url_encode(bytes(33)))
    with schema_error(match="32-byte key"):
        HEPublicKey(**ok, public_key=KEY + "=")  # one spelling per key: no padding
    with schema_error(match="attempt must be 1-128"):
        HEPublicKey(**{**ok, "attempt": ""}, public_key=KEY)
    with schema_error(match="hex SHA-256"):
        HEKeyAck(**ok, public_context_sha256=HEX.upper(), key_id=HEX)
    with schema_error(match="hex SHA-256"):
        HEKeyAck(**ok, public_context_sha256=HEX, key_id="")


def test_sealed_key_bounds() -> None:
    with schema_error(match="payload must hold 1 to"):
        sealed(payload=b"")
    with schema_error(match="payload must hold 1 to"):
        sealed(payload=b"x" * (4 * 1024 * 1024 + 1))
    # The secret context (~550 KB) can never pass as the public context the coordinator keeps.
    with schema_error(match="public_context must be base64url"):
        sealed(public_context=b64url_encode(b"\x01" * 3073))
    with schema_error(match="public_context must be base64url"):
        sealed(public_context="")
    with schema_error(match="32-byte key"):
        sealed(key_site_public="AAAA")


def pk(site: str, attempt: str = "a1") -> dict[str, Any]:
    return HEPublicKey(
        run_id="run-1", attempt=attempt, site_id=site, public_key=KEY, signature=SIG
    ).body()


def test_directory_bounds() -> None:
    with schema_error(match="must hold 1-256 keys"):
        HEKeyDirectory(run_id="run-1", attempt="a1", keys=[])
    with schema_error(match="names a site twice"):
        HEKeyDirectory(run_id="run-1", attempt="a1", keys=[pk("a"), pk("a")])
    with schema_error(match="another run or attempt"):
        HEKeyDirectory(run_id="run-1", attempt="a1", keys=[pk("a"), pk("b", attempt="a0")])
    with schema_error(match="missing or not allowed"):
        HEKeyDirectory(run_id="run-1", attempt="a1", keys=[{**pk("a"), "extra": 1}])
    with schema_error(match="malformed key"):
        HEKeyDirectory(run_id="run-1", attempt="a1", keys=["a"])  # type: ignore[list-item]
    directory = HEKeyDirectory(run_id="run-1", attempt="a1", keys=[pk("a"), pk("b")])
    assert [k.site_id for k in directory.public_keys()] == ["a", "b"]


def frame(body: dict[str, Any], payload: bytes = b"", type_: str = "he_key_ack") -> bytes:
    raw = json.dumps({"type": type_, "id": "m", "body": body}).encode()
    return struct.pack(">3sBI", b"TSR", 1, len(raw)) + raw + payload


def test_the_codec_refuses_malformed_bodies_with_schema() -> None:
    body = HEKeyAck(
        run_id="run-1",
        attempt="a1",
        site_id="b",
        public_context_sha256=HEX,
        key_id=HEX,
        signature=SIG,
    ).body()
    assert isinstance(decode(frame(body)), HEKeyAck)
    missing = {k: v for k, v in body.items() if k != "attempt"}
    for bad in (
        frame({**body, "attempt": 1}),  # wrong type
        frame(missing),
        frame({**body, "public_context_sha256": "zz" * 32}),
        frame({**body, "site_id": "a b"}),
        frame(body, b"stray"),  # an ack carries no payload
        frame({**sealed().body()}, b"", "he_sealed_key"),  # a sealed key needs its blob
    ):
        with pytest.raises(RemoteProtocolError) as info:
            decode(bad)
        assert info.value.code == "protocol.schema"


def test_a_sealed_key_over_the_frame_limit_is_refused_before_parsing() -> None:
    frame = encode(sealed(payload=b"\x02" * 5000))
    with pytest.raises(RemoteProtocolError, match="payload is too large") as info:
        decode(frame, Limits(max_payload_bytes=4096))
    assert info.value.code == "protocol.too_large"


def test_each_end_accepts_only_what_the_other_sends() -> None:
    coordinator: set[type[Message]] = set(CoordinatorSession.allowed[Phase.ESTABLISHED])
    site: set[type[Message]] = set(SiteSession.allowed[Phase.ESTABLISHED])
    to_coordinator: set[type[Message]] = {HEPublicKey, HESealedKey, HEKeyAck}
    to_site: set[type[Message]] = {HEKeyRequest, HEKeyDirectory, HESealedKey}
    assert to_coordinator <= coordinator and not (to_site - to_coordinator) & coordinator
    assert to_site <= site and not (to_coordinator - to_site) & site
