"""Domain-separated Ed25519 signatures over structured data.

Theory of operation
-------------------
We never sign raw bytes handed to us. We sign::

    b"tessera/v1/" + purpose + b"\\n" + canonical_json(fields)

The prefix and the ``purpose`` ("auth", "enrol", "update", "model", "plan", ...) are domain
separation: a signature made to answer an authentication challenge can never be replayed as a
signature on a model update, even if the field values happen to coincide. ``purpose`` is
restricted to ``[a-z][a-z0-9._-]*`` so it cannot contain the newline that ends it, which keeps
the encoding unambiguous. ``canonical_json`` (sorted keys, no whitespace, UTF-8) gives one byte
string per value, so both sides build the same payload from the same fields.

Signatures travel as URL-safe base64 without padding (86 characters), like public keys.
Verification raises :class:`~shared.errors.SignatureError` (code ``crypto.bad_signature``) for
every signature that is wrong, whatever the reason: malformed text, wrong length, wrong key,
wrong purpose or changed fields. Ed25519 is deterministic (RFC 8032 section 5.1.6): signing the
same fields twice gives the same text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from shared.canonical import canonical_json
from shared.crypto.keys import b64url_decode, b64url_encode, public_key_from_b64
from shared.errors import CryptoError, SignatureError

__all__ = ["DOMAIN_PREFIX", "sign", "signing_payload", "verify"]

DOMAIN_PREFIX = b"tessera/v1/"
SIGNATURE_BYTES = 64

_PURPOSE = re.compile(r"[a-z][a-z0-9._-]{0,63}")


def signing_payload(purpose: str, fields: Mapping[str, Any]) -> bytes:
    """The exact bytes that :func:`sign` signs and :func:`verify` checks."""
    if not isinstance(purpose, str) or not _PURPOSE.fullmatch(purpose):
        raise CryptoError(
            f"Invalid signature purpose {purpose!r}: use lower-case letters, digits, '.', '_' "
            "or '-'. This is a bug in Tessera; please report it.",
            code="crypto.bad_purpose",
        )
    if not isinstance(fields, Mapping):
        raise CryptoError(
            f"Signed fields must be a mapping, not {type(fields).__name__}. This is a bug in "
            "Tessera; please report it.",
            code="crypto.unsignable",
        )
    bad_key = _non_string_key(fields)
    if bad_key is not None:
        raise CryptoError(
            f"These {purpose} fields cannot be signed: the key {bad_key!r} is not a string "
            "(JSON would turn it into one, so the signed data would not be what the receiver "
            "sees). This is a bug in Tessera; please report it.",
            code="crypto.unsignable",
        )
    try:
        body = canonical_json(dict(fields))
    except (TypeError, ValueError) as exc:
        raise CryptoError(
            f"These {purpose} fields cannot be signed: {exc}. Only str, int, float, bool, "
            "None, lists and string-keyed dicts can be signed; encode bytes as hex first.",
            code="crypto.unsignable",
        ) from exc
    return DOMAIN_PREFIX + purpose.encode("ascii") + b"\n" + body


def _non_string_key(value: Any) -> object | None:
    """The first mapping key anywhere in ``value`` that is not a ``str``, else ``None``."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            for key, child in item.items():
                if not isinstance(key, str):
                    return key
                stack.append(child)
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return None


def sign(private_key: Ed25519PrivateKey, purpose: str, fields: Mapping[str, Any]) -> str:
    """Sign ``fields`` for ``purpose``; returns 86 characters of URL-safe base64."""
    if not isinstance(private_key, Ed25519PrivateKey):
        raise CryptoError(
            f"Expected an Ed25519 private key, got {type(private_key).__name__}. This is a "
            "bug in Tessera; please report it.",
            code="crypto.bad_key",
        )
    return b64url_encode(private_key.sign(signing_payload(purpose, fields)))


def verify(
    public_key: Ed25519PublicKey | str,
    purpose: str,
    fields: Mapping[str, Any],
    signature_b64: str,
) -> None:
    """Return if ``signature_b64`` is the key owner's signature on ``fields`` for ``purpose``.

    Raises ``SignatureError`` otherwise. ``public_key`` may be a key or its base64 text; bad
    key text raises ``CryptoError`` (code ``crypto.bad_public_key``), since that is a problem
    with what we stored or were sent as a key, not with this signature.
    """
    key = public_key_from_b64(public_key) if isinstance(public_key, str) else public_key
    if not isinstance(key, Ed25519PublicKey):
        raise CryptoError(
            f"Expected an Ed25519 public key, got {type(key).__name__}. This is a bug in "
            "Tessera; please report it.",
            code="crypto.bad_public_key",
        )
    payload = signing_payload(purpose, fields)
    raw = b64url_decode(signature_b64) if isinstance(signature_b64, str) else None
    if raw is None or len(raw) != SIGNATURE_BYTES:
        raise SignatureError(
            f"The signature on this {purpose} message is malformed (expected 86 characters "
            "of URL-safe base64), so it does not match. It was not accepted; if this keeps "
            "happening, check that both sides run the same Tessera version.",
            code="crypto.bad_signature",
            purpose=purpose,
        )
    try:
        key.verify(raw, payload)
    except InvalidSignature as exc:
        raise SignatureError(
            f"The signature on this {purpose} message does not match the sender's key: it "
            "was changed on the way or signed by someone else. It was not accepted; if this "
            "keeps happening, tell the consortium lead.",
            code="crypto.bad_signature",
            purpose=purpose,
        ) from exc
