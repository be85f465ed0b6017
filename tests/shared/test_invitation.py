"""Invitation codes: round trip, typo detection, garbage, expiry, tokens."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from shared.canonical import canonical_json
from shared.errors import InvitationError
from shared.identity.invitation import (
    PREFIX,
    Invitation,
    decode_invitation,
    encode_invitation,
    is_expired,
    new_token,
    token_digest,
    token_matches,
)

BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
INV = Invitation(
    coordinator_url="wss://127.0.0.1:8765",
    fingerprint="0f" * 32,
    token="tok_" + "A" * 40,
    federation="Nordic chest X-ray consortium",
    expires_at=1_900_000_000,
)
INCOMPLETE = "This invitation code is incomplete or mistyped"


def _hand_made(body: dict) -> str:
    """A code with a valid checksum around arbitrary JSON, as an attacker could make."""
    import hashlib

    raw = canonical_json(body)
    data = raw + hashlib.sha256(raw).digest()[:4]
    return PREFIX + base64.b32encode(data).decode().rstrip("=")


invitations = st.builds(
    Invitation,
    coordinator_url=st.sampled_from(
        ["wss://127.0.0.1:8765", "wss://coord.example.org", "wss://[::1]:443/tessera"]
    ),
    fingerprint=st.text("0123456789abcdef", min_size=64, max_size=64),
    token=st.text(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
        min_size=22,
        max_size=128,
    ),
    federation=st.text(
        st.characters(exclude_categories=("Cc", "Cf", "Cs")), min_size=1, max_size=200
    ).filter(lambda s: s == s.strip()),
    expires_at=st.integers(0, 2**63 - 1),
)


def test_code_shape():
    code = encode_invitation(INV)
    assert code.startswith("TESSERA-1-")
    body = code.removeprefix(PREFIX)
    assert set(body) <= set(BASE32)
    assert "\n" not in code and "=" not in code


@given(invitations)
def test_round_trip(inv):
    assert decode_invitation(encode_invitation(inv)) == inv


def test_decoding_ignores_case_dashes_and_line_breaks():
    code = encode_invitation(INV)
    body = code.removeprefix(PREFIX)
    grouped = "-".join(body[i : i + 5] for i in range(0, len(body), 5))
    wrapped = "\n  ".join(grouped[i : i + 40] for i in range(0, len(grouped), 40))
    assert decode_invitation("  tessera-1-" + wrapped.lower() + "\r\n") == INV


@given(st.data())
def test_any_single_character_change_is_detected(data):
    code = encode_invitation(INV)
    i = data.draw(st.integers(len(PREFIX), len(code) - 1))
    new = data.draw(st.sampled_from(BASE32).filter(lambda c: c != code[i]))
    with pytest.raises(InvitationError, match=INCOMPLETE) as info:
        decode_invitation(code[:i] + new + code[i + 1 :])
    assert info.value.code == "identity.invitation_malformed"


def test_swapped_neighbours_are_detected():
    code = encode_invitation(INV)
    i = next(j for j in range(len(PREFIX), len(code) - 1) if code[j] != code[j + 1])
    with pytest.raises(InvitationError, match="checksum does not match"):
        decode_invitation(code[:i] + code[i + 1] + code[i] + code[i + 2 :])


@pytest.mark.parametrize("cut", [1, 2, 5, 8, 100])
def test_truncated_code_is_detected(cut):
    code = encode_invitation(INV)
    with pytest.raises(InvitationError, match=INCOMPLETE):
        decode_invitation(code[:-cut])


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("", "should start with TESSERA-1-"),
        ("hello", "should start with TESSERA-1-"),
        ("TESSERA-2-ABCDEFGH", "should start with TESSERA-1-"),
        ("TESSERA-1-", "nothing follows"),
        ("TESSERA-1-ABC0EFGH", "only A-Z, 2-7"),
        ("TESSERA-1-A", "missing or extra"),
        ("TESSERA-1-AAAAAAAA", "checksum does not match"),
        ("TESSERA-1-" + "A" * 5000, "much longer"),
    ],
)
def test_garbage_examples(code, reason):
    with pytest.raises(InvitationError, match=reason):
        decode_invitation(code)


@given(st.text(max_size=300))
def test_arbitrary_text_only_raises_invitation_error(text):
    try:
        decode_invitation(text)
    except InvitationError as exc:
        assert exc.code == "identity.invitation_malformed"
        assert str(exc).startswith(INCOMPLETE)


@given(st.text(BASE32 + "-", max_size=400))
def test_arbitrary_base32_only_raises_invitation_error(body):
    with pytest.raises(InvitationError, match=INCOMPLETE):
        decode_invitation(PREFIX + body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)


@given(json_values)
def test_hand_made_codes_with_valid_checksum_only_raise_invitation_error(value):
    try:
        code = _hand_made(value)
    except ValueError:  # NaN / Infinity cannot be canonical JSON
        assume(False)
    with pytest.raises(InvitationError, match=INCOMPLETE):
        decode_invitation(code)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"u": "ws://127.0.0.1:8765"}, "must start with wss://"),
        ({"u": "https://127.0.0.1"}, "must start with wss://"),
        ({"u": "wss://user:pw@host:1"}, "user name or password"),
        ({"u": "wss://:1"}, "no host name"),
        ({"u": "wss://host:99999"}, "not a valid address"),
        ({"f": "0F" * 32}, "64 lower-case hexadecimal"),
        ({"t": "short"}, "token is missing or too short"),
        ({"n": ""}, "federation name is missing"),
        ({"n": "Evil\u202eenilno"}, "invisible or control characters"),
        ({"e": 1.5}, "whole number of seconds"),
        ({"e": True}, "whole number of seconds"),
        ({"e": -1}, "whole number of seconds"),
    ],
)
def test_hand_made_codes_with_bad_fields(change, reason):
    body = json.loads(
        canonical_json({"e": 1, "f": "0f" * 32, "n": "x", "t": "A" * 22, "u": "wss://h"})
    )
    with pytest.raises(InvitationError, match=reason):
        decode_invitation(_hand_made({**body, **change}))


def test_extra_or_missing_keys_are_rejected():
    body = {"e": 1, "f": "0f" * 32, "n": "x", "t": "A" * 22, "u": "wss://h"}
    assert decode_invitation(_hand_made(body)).federation == "x"
    with pytest.raises(InvitationError, match="expected information"):
        decode_invitation(_hand_made({**body, "admin": True}))
    with pytest.raises(InvitationError, match="expected information"):
        decode_invitation(_hand_made({k: v for k, v in body.items() if k != "t"}))


def test_non_canonical_json_is_rejected():
    import hashlib

    raw = b'{"u":"wss://h","e":1,"f":"' + b"0f" * 32 + b'","n":"x","t":"' + b"A" * 22 + b'"}'
    code = PREFIX + base64.b32encode(raw + hashlib.sha256(raw).digest()[:4]).decode().rstrip("=")
    with pytest.raises(InvitationError, match="not in the standard form"):
        decode_invitation(code)


def test_invalid_invitation_cannot_be_built():
    with pytest.raises(InvitationError, match="must start with wss://"):
        Invitation(
            coordinator_url="ws://x",
            fingerprint="0" * 64,
            token="A" * 22,
            federation="f",
            expires_at=0,
        )


def test_expiry():
    assert not is_expired(INV, INV.expires_at - 0.5)
    assert is_expired(INV, INV.expires_at)
    assert is_expired(INV, INV.expires_at + 1)


def test_tokens():
    token = new_token()
    assert len(token) == 43  # 256 bits
    assert token != new_token()
    digest = token_digest(token)
    assert len(digest) == 64 and token not in digest
    assert token_matches(token, digest)
    assert not token_matches(new_token(), digest)
    assert not token_matches("\ud800", digest)
    assert not token_matches(token, "é" * 64)
    Invitation(
        coordinator_url="wss://h",
        fingerprint="0" * 64,
        token=token,
        federation="f",
        expires_at=0,
    )
