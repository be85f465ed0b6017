"""Invitation codes: how a site learns, out of band, where the coordinator is and how to trust it.

Theory of operation
-------------------
The operator runs ``tessera-coordinator invite "Site name"``; the coordinator makes a one-time
token, stores only its SHA-256 (:func:`token_digest`), and prints a code that holds:

* the coordinator's ``wss://`` address,
* the SHA-256 fingerprint of its TLS certificate (the site pins it, see ``shared.crypto.tls``),
* the token, the federation's name and the expiry time (Unix seconds).

The code is ``TESSERA-1-`` followed by RFC 4648 base32 (upper case, no padding) of::

    canonical_json({"e": expires_at, "f": fingerprint, "n": federation,
                    "t": token, "u": coordinator_url}) + sha256(that JSON)[:4]

Base32 because it survives e-mail, chat, PDF and being read aloud (one case, no punctuation);
the 4-byte checksum makes a mistyped or truncated code fail with a clear message instead of
decoding to a different invitation (a wrong code passes with probability 2**-32). The body is
not grouped with dashes so that double-clicking selects it in one piece; on decoding, case,
dashes and whitespace (line breaks added by mail clients) are ignored. Decoding is strict
otherwise: the JSON must be exactly what the encoder writes, so an invitation has one code.

The code is a bearer secret until redeemed or expired: anyone who has it can enrol as the site.
It is not signed, because the site has no key of the coordinator's yet; the fingerprint is
what makes the first connection trustworthy, and the operator's channel is what protects it.

Everything here is pure: no clock (``is_expired`` takes ``now``) and no I/O.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import re
import secrets
import unicodedata
from base64 import b32decode, b32encode
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from shared.canonical import canonical_json, sha256_hex
from shared.errors import InvitationError

__all__ = [
    "PREFIX",
    "Invitation",
    "decode_invitation",
    "encode_invitation",
    "is_expired",
    "new_token",
    "token_digest",
    "token_matches",
]

PREFIX = "TESSERA-1-"
CHECKSUM_BYTES = 4
TOKEN_BYTES = 32  # 256 bits from secrets.token_urlsafe
MAX_CODE_CHARS = 4096  # far above any real code; bounds the work done on garbage

MAX_URL_CHARS = 2048
MAX_FEDERATION_CHARS = 200
_TOKEN = re.compile(r"[A-Za-z0-9_-]{22,128}")  # >= 128 bits of URL-safe base64
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BASE32 = re.compile(r"[A-Z2-7]*")
_STRIP = re.compile(r"[\s-]")
_KEYS = {"e", "f", "n", "t", "u"}
# Control, format (e.g. bidirectional overrides, which can disguise a name) and surrogate
# characters have no business in a federation name shown to hospital staff.
_BANNED_CATEGORIES = {"Cc", "Cf", "Cs"}

_MALFORMED = "identity.invitation_malformed"


def _malformed(detail: str) -> InvitationError:
    return InvitationError(
        f"This invitation code is incomplete or mistyped: {detail}. Copy the whole code again; "
        "if that does not help, ask the consortium lead for a new code.",
        code=_MALFORMED,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Invitation:
    """What an invitation code holds; invalid values cannot be built (``InvitationError``)."""

    coordinator_url: str
    fingerprint: str
    token: str
    federation: str
    expires_at: int

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem is not None:
            raise InvitationError(f"Invalid invitation: {problem}.", code=_MALFORMED)


def _problem(inv: Invitation) -> str | None:
    """What is wrong with ``inv`` in plain words, or ``None``."""
    url = inv.coordinator_url
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        return "the coordinator address is missing or too long"
    if not url.isascii() or any(not ch.isprintable() or ch.isspace() for ch in url):
        return "the coordinator address contains spaces or unusual characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "the coordinator address is not a valid address"
    if parts.scheme != "wss":
        return "the coordinator address must start with wss:// (an encrypted connection)"
    if not parts.hostname:
        return "the coordinator address has no host name"
    if parts.username is not None or parts.password is not None:
        return "the coordinator address must not contain a user name or password"
    if parts.query or parts.fragment or port == 0:
        return "the coordinator address is not a valid address"
    if not isinstance(inv.fingerprint, str) or not _HEX64.fullmatch(inv.fingerprint):
        return "the certificate fingerprint is not 64 lower-case hexadecimal digits"
    if not isinstance(inv.token, str) or not _TOKEN.fullmatch(inv.token):
        return "the one-time token is missing or too short"
    name = inv.federation
    if not isinstance(name, str) or not name or len(name) > MAX_FEDERATION_CHARS:
        return "the federation name is missing or too long"
    if name != name.strip() or any(unicodedata.category(ch) in _BANNED_CATEGORIES for ch in name):
        return "the federation name contains invisible or control characters"
    if type(inv.expires_at) is not int or not 0 <= inv.expires_at < 2**63:
        return "the expiry time is not a whole number of seconds"
    return None


def _checksum(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()[:CHECKSUM_BYTES]


def _body(inv: Invitation) -> bytes:
    return canonical_json(
        {
            "e": inv.expires_at,
            "f": inv.fingerprint,
            "n": inv.federation,
            "t": inv.token,
            "u": inv.coordinator_url,
        }
    )


def encode_invitation(inv: Invitation) -> str:
    """The single-line code to hand to a site: ``TESSERA-1-`` + base32 (see module docstring)."""
    body = _body(inv)
    return PREFIX + b32encode(body + _checksum(body)).decode("ascii").rstrip("=")


def decode_invitation(code: str) -> Invitation:
    """Inverse of :func:`encode_invitation`. Any other text raises ``InvitationError``.

    Does not check expiry (call :func:`is_expired` with the current time) and does not
    contact anyone.
    """
    if not isinstance(code, str):
        raise _malformed("it is not text")
    if len(code) > MAX_CODE_CHARS:
        raise _malformed("it is much longer than any invitation code")
    text = _STRIP.sub("", code).upper()
    prefix = _STRIP.sub("", PREFIX)
    if not text.startswith(prefix):
        raise _malformed(f"it should start with {PREFIX}")
    data = text[len(prefix) :]
    if not data:
        raise _malformed("nothing follows " + PREFIX)
    if not _BASE32.fullmatch(data):
        raise _malformed("it contains characters that never appear in a code (only A-Z, 2-7)")
    if len(data) % 8 in (1, 3, 6):
        raise _malformed("some characters are missing or extra")
    try:
        raw = b32decode(data + "=" * (-len(data) % 8))
    except (binascii.Error, ValueError) as exc:
        raise _malformed("some characters are missing or extra") from exc
    if b32encode(raw).decode("ascii").rstrip("=") != data:
        raise _malformed("the last character is wrong")
    body, check = raw[:-CHECKSUM_BYTES], raw[-CHECKSUM_BYTES:]
    if len(raw) <= CHECKSUM_BYTES or not hmac.compare_digest(_checksum(body), check):
        raise _malformed("the checksum does not match, so a character was changed or lost")
    return _parse_body(body)


def _parse_body(body: bytes) -> Invitation:
    # The checksum only catches accidents; a hand-made code can still carry any bytes here.
    try:
        value: Any = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _malformed("its contents are not readable") from exc
    if not isinstance(value, dict) or set(value) != _KEYS:
        raise _malformed("it does not contain the expected information")
    try:
        inv = Invitation(
            coordinator_url=value["u"],
            fingerprint=value["f"],
            token=value["t"],
            federation=value["n"],
            expires_at=value["e"],
        )
    except InvitationError as exc:
        raise _malformed(_problem_text(exc)) from exc
    if _body(inv) != body:
        raise _malformed("its contents are not in the standard form")
    return inv


def _problem_text(exc: InvitationError) -> str:
    return exc.message.removeprefix("Invalid invitation: ").rstrip(".")


def is_expired(inv: Invitation, now: float) -> bool:
    """True from ``expires_at`` on (``now`` in Unix seconds)."""
    return now >= inv.expires_at


def new_token() -> str:
    """A fresh one-time enrolment token: 256 random bits as 43 URL-safe base64 characters."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_digest(token: str) -> str:
    """Hex SHA-256 of a token: all the coordinator stores, so a leaked database enrols no one.

    A plain hash is enough (no salt or slow KDF) because tokens have 256 random bits.
    """
    return sha256_hex(token.encode("utf-8"))


def token_matches(token: str, digest: str) -> bool:
    """Constant-time check of a presented token against a stored :func:`token_digest`."""
    if not isinstance(token, str) or not isinstance(digest, str) or not (token + digest).isascii():
        return False
    return hmac.compare_digest(token_digest(token), digest)
