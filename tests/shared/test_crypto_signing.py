"""Domain-separated signatures."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.crypto.keys import generate_signing_key, public_key_b64
from shared.crypto.signing import sign, signing_payload, verify
from shared.errors import CryptoError, SignatureError

KEY = generate_signing_key()
FIELDS = {"round": 3, "site": "st-olav", "digest": "ab" * 32, "weights": [0.5, 1.0]}


def test_payload_layout():
    assert signing_payload("update", {"b": 1, "a": "x"}) == b'tessera/v1/update\n{"a":"x","b":1}'


def test_sign_and_verify_with_key_object_and_text():
    signature = sign(KEY, "update", FIELDS)
    assert len(signature) == 86
    verify(KEY.public_key(), "update", FIELDS, signature)
    verify(public_key_b64(KEY), "update", FIELDS, signature)


def test_signature_is_deterministic_and_key_order_independent():
    reordered = dict(reversed(list(FIELDS.items())))
    assert sign(KEY, "update", FIELDS) == sign(KEY, "update", reordered)


def test_wrong_purpose_is_rejected():
    signature = sign(KEY, "auth", FIELDS)
    with pytest.raises(SignatureError, match="signature on this update message does not match"):
        verify(KEY.public_key(), "update", FIELDS, signature)


def test_tampered_field_is_rejected():
    signature = sign(KEY, "update", FIELDS)
    with pytest.raises(SignatureError, match="does not match the sender's key") as info:
        verify(KEY.public_key(), "update", {**FIELDS, "round": 4}, signature)
    assert info.value.code == "crypto.bad_signature"


def test_extra_field_is_rejected():
    signature = sign(KEY, "update", FIELDS)
    with pytest.raises(SignatureError, match="does not match"):
        verify(KEY.public_key(), "update", {**FIELDS, "note": ""}, signature)


def test_wrong_key_is_rejected():
    signature = sign(generate_signing_key(), "update", FIELDS)
    with pytest.raises(SignatureError, match="signed by someone else"):
        verify(KEY.public_key(), "update", FIELDS, signature)


def test_flipped_signature_bit_is_rejected():
    signature = sign(KEY, "update", FIELDS)
    changed = ("B" if signature[10] == "A" else "A").join([signature[:10], signature[11:]])
    with pytest.raises(SignatureError, match="does not match the sender's key"):
        verify(KEY.public_key(), "update", FIELDS, changed)


@pytest.mark.parametrize(
    "signature",
    ["", "!!!", "A" * 85, "A" * 87, "A" * 86 + "==", "A" * 43, None, b"A" * 86],
)
def test_malformed_signature_is_rejected(signature):
    with pytest.raises(SignatureError, match="malformed") as info:
        verify(KEY.public_key(), "update", FIELDS, signature)
    assert info.value.code == "crypto.bad_signature"


@pytest.mark.parametrize("purpose", ["", "Update", "auth\n{}", "a b", "ü", "x" * 65])
def test_invalid_purpose(purpose):
    with pytest.raises(CryptoError, match="Invalid signature purpose"):
        sign(KEY, purpose, FIELDS)


def test_purpose_cannot_smuggle_fields():
    # Without the purpose rule, "auth\n{...}" + {} could equal "auth" + {...}.
    with pytest.raises(CryptoError, match="Invalid signature purpose"):
        signing_payload('auth\n{"a":1}', {})


@pytest.mark.parametrize("fields", [{"x": float("nan")}, {"x": b"bytes"}, {1: "int key"}])
def test_unsignable_fields(fields):
    with pytest.raises(CryptoError, match="cannot be signed") as info:
        sign(KEY, "plan", fields)
    assert info.value.code == "crypto.unsignable"


def test_bad_public_key_text():
    with pytest.raises(CryptoError, match="not a Tessera public key"):
        verify("garbage", "update", FIELDS, sign(KEY, "update", FIELDS))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_any_json_fields_round_trip(fields):
    verify(KEY.public_key(), "model", fields, sign(KEY, "model", fields))
