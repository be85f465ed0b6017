"""Ed25519 identities: make, store, load and print them.

Theory of operation
-------------------
Every site and the coordinator own one Ed25519 key pair (RFC 8032). The private key is made on
the machine that uses it and stays in a PKCS #8 PEM file (RFC 5958) that is readable only by its
owner: the file is created with mode 0600 in the same system call that creates it, so there is
no moment at which another user could open it. A passphrase, if given, encrypts the file with
the best scheme the ``cryptography`` package offers.

Public keys travel as text: the raw 32-byte key (RFC 8032 section 5.1.5) in URL-safe base64
without padding (RFC 4648 section 5), 43 characters. URL-safe because the text ends up in JSON,
URLs and file names; unpadded because the length is fixed. Decoding is strict: only the exact
text that :func:`public_key_b64` would write is accepted, so one key has one spelling.

``key_fingerprint`` is for people (a settings page, a log line), not for security decisions:
compare full public keys in code.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from shared.canonical import sha256_hex
from shared.errors import CryptoError, KeyFileError

__all__ = [
    "generate_signing_key",
    "key_fingerprint",
    "load_private_key",
    "public_key_b64",
    "public_key_from_b64",
    "save_private_key",
]

PUBLIC_KEY_BYTES = 32
FINGERPRINT_HEX_CHARS = 16

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


# --- base64 (shared with signing.py) ---------------------------------------------------------


def b64url_encode(data: bytes) -> str:
    """URL-safe base64 without padding (RFC 4648 section 5)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes | None:
    """Strict inverse of :func:`b64url_encode`; ``None`` for anything it would not write.

    Rejects padding, whitespace, the standard alphabet's ``+`` and ``/`` and non-zero unused
    trailing bits, so every byte string has exactly one accepted spelling.
    """
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if b64url_encode(data) == text else None


# --- key pairs -------------------------------------------------------------------------------


def generate_signing_key() -> Ed25519PrivateKey:
    """A new Ed25519 private key from the operating system's random source."""
    return Ed25519PrivateKey.generate()


def _raw_public(key_or_pub: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    if isinstance(key_or_pub, Ed25519PrivateKey):
        key_or_pub = key_or_pub.public_key()
    if not isinstance(key_or_pub, Ed25519PublicKey):
        raise CryptoError(
            f"Expected an Ed25519 key, got {type(key_or_pub).__name__}. This is a bug in "
            "Tessera; please report it.",
            code="crypto.bad_public_key",
        )
    return key_or_pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_b64(key_or_pub: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public half as 43 characters of URL-safe base64 (raw 32 bytes, no padding)."""
    return b64url_encode(_raw_public(key_or_pub))


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    """Inverse of :func:`public_key_b64`; ``CryptoError`` for anything else."""
    raw = b64url_decode(text)
    if raw is None or len(raw) != PUBLIC_KEY_BYTES:
        raise CryptoError(
            "This is not a Tessera public key (expected 43 characters of URL-safe base64). "
            "Copy the key again in full, or ask its owner to send it again.",
            code="crypto.bad_public_key",
        )
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise CryptoError(
            "This public key is not a valid Ed25519 key. Ask its owner to send it again.",
            code="crypto.bad_public_key",
        ) from exc


def key_fingerprint(key_or_pub: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """First 16 hex digits of SHA-256 over the raw public key, for showing to people."""
    return sha256_hex(_raw_public(key_or_pub))[:FINGERPRINT_HEX_CHARS]


# --- files -----------------------------------------------------------------------------------


def write_private_file(path: str | os.PathLike[str], data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` to a new file that is 0600 from the moment it exists.

    Without ``overwrite`` the file is created with ``O_EXCL``, so an existing key is never
    replaced by accident (and a symlink planted at ``path`` is not followed). With it, the data
    goes to a fresh 0600 file next to ``path`` that then replaces it atomically, so a crash
    leaves either the old key or the new one, never half of one. Also used by ``tls.py``.
    On Windows the mode bits are ignored; the file inherits the folder's ACL.
    """
    target = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    write_to = tmp if overwrite else target
    try:
        fd = os.open(write_to, flags, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(
            f"A key file already exists at {target}. Tessera will not replace it, because "
            "that would lose the identity it holds. Move it away first if you really want a "
            "new one.",
            code="crypto.key_file",
        ) from exc
    except OSError as exc:
        raise KeyFileError(
            f"Cannot create the key file {target}: {exc.strerror}. Check that the folder "
            "exists and that you may write to it.",
            code="crypto.key_file",
        ) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o600)  # in case the file system ignored the mode
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(write_to)
        raise


def save_private_key(
    key: Ed25519PrivateKey,
    path: str | os.PathLike[str],
    passphrase: bytes | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Store ``key`` as PKCS #8 PEM in a new 0600 file, encrypted if a passphrase is given."""
    if not isinstance(key, Ed25519PrivateKey):
        raise CryptoError(
            f"Expected an Ed25519 private key, got {type(key).__name__}. This is a bug in "
            "Tessera; please report it.",
            code="crypto.key_file",
        )
    if passphrase is None:
        encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    elif isinstance(passphrase, bytes) and passphrase:
        encryption = serialization.BestAvailableEncryption(passphrase)
    else:
        raise KeyFileError(
            "The passphrase is empty. Enter a passphrase, or choose to store the key without one.",
            code="crypto.key_file",
        )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    write_private_file(path, pem, overwrite=overwrite)


def load_private_key(
    path: str | os.PathLike[str], passphrase: bytes | None = None
) -> Ed25519PrivateKey:
    """Read a key written by :func:`save_private_key`; ``KeyFileError`` says what went wrong."""
    target = Path(path)
    try:
        data = target.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(
            f"No key file at {target}. If this machine was enrolled before, restore the key "
            "file from your backup; otherwise enrol again with a new invitation code.",
            code="crypto.key_file",
        ) from exc
    except OSError as exc:
        raise KeyFileError(
            f"Cannot read the key file {target}: {exc.strerror}. Check that it belongs to "
            "the user running Tessera.",
            code="crypto.key_file",
        ) from exc

    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
    if encrypted and not passphrase:
        raise KeyFileError(
            f"The key file {target} is protected by a passphrase. Enter the passphrase.",
            code="crypto.key_file",
        )
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        if encrypted:
            message = (
                f"Wrong passphrase for the key file {target}, or the file is damaged. "
                "Check the passphrase and try again."
            )
        else:
            message = (
                f"The file {target} is not a readable private key (damaged or not a PEM "
                "key file). Restore it from your backup."
            )
        raise KeyFileError(message, code="crypto.key_file") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"The key file {target} holds a {type(key).__name__.removeprefix('_')} key, not "
            "an Ed25519 key. Point Tessera at the key file it created.",
            code="crypto.key_file",
        )
    return key
