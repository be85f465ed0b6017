"""TLS for the coordinator link, trusted by certificate pinning instead of a CA.

Theory of operation
-------------------
Small hospitals cannot be asked to buy and renew CA certificates, so the coordinator makes its
own self-signed certificate (ECDSA P-256) and the operator's invitation code carries the
SHA-256 fingerprint of that certificate's DER encoding. A site connects with a client context
that does *no* CA or host-name verification (there is no CA to trust) and then compares the
certificate the server actually presented with the fingerprint from the invitation, in
constant time (:func:`check_pin`). This is the "pinned self-signed certificate" pattern of
RFC 7469 section 1 / RFC 6125 section 1.5, with the pin delivered out of band.

The check happens after the TLS and WebSocket handshakes and *before* Tessera sends anything
of its own. The handshakes send nothing secret (the URL path, Host, a random
Sec-WebSocket-Key, the user agent), so nothing must be put in the URL or in extra headers:
tokens and signatures go in messages after the pin is checked. :func:`connect_pinned_sync` and
:func:`connect_pinned` are context managers that connect, check and close on a mismatch, so
callers cannot forget the check. Python's ``ssl`` module has no verification callback, which
is why the check cannot run inside the handshake.

Both ends are ours, so both require TLS 1.3 (RFC 8446); there is no older peer to support.

Where the ``ssl`` object lives in websockets (14+, checked against 17.4's source):

* ``websockets.sync.client.ClientConnection.socket`` is the ``ssl.SSLSocket`` for ``wss://``
  (or, through an HTTPS proxy, websockets' ``SSLSSLSocket``, whose ``.ssl_object`` is an
  ``ssl.SSLObject``);
* ``websockets.asyncio.client.ClientConnection.transport.get_extra_info("ssl_object")`` is the
  ``ssl.SSLObject``.

:func:`ssl_object_of` hides that difference.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import os
import re
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.crypto.keys import write_private_file
from shared.errors import ConnectionFailed, CryptoError, KeyFileError

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection as AsyncClientConnection
    from websockets.sync.client import ClientConnection as SyncClientConnection

__all__ = [
    "certificate_fingerprint",
    "check_pin",
    "connect_pinned",
    "connect_pinned_sync",
    "fingerprint_of_file",
    "generate_self_signed",
    "normalize_fingerprint",
    "pinned_client_ssl_context",
    "server_ssl_context",
    "ssl_object_of",
]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CLOCK_SKEW = dt.timedelta(minutes=5)


# --- certificates ----------------------------------------------------------------------------


def generate_self_signed(
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    *,
    hosts: list[str] | None = None,
    days: int = 825,
    overwrite: bool = False,
    now: dt.datetime | None = None,
) -> str:
    """Make a self-signed ECDSA P-256 certificate and key; return the certificate's fingerprint.

    ``hosts`` (default ``["localhost", "127.0.0.1"]``) become subjectAltName entries: IP
    addresses as iPAddress, everything else as dNSName (RFC 5280 section 4.2.1.6). Clients pin
    the fingerprint rather than checking names, but the names make the certificate usable by
    ordinary tools. The key file is 0600 from creation; neither file replaces an existing one
    unless ``overwrite``. ``now`` is for tests; validity starts five minutes before it to
    tolerate clock skew. 825 days is the longest validity that common TLS clients accept.
    """
    hosts = ["localhost", "127.0.0.1"] if hosts is None else list(hosts)
    if not hosts:
        raise CryptoError(
            "A certificate needs at least one host name or IP address.", code="crypto.tls"
        )
    if days < 1:
        raise CryptoError("A certificate must be valid for at least one day.", code="crypto.tls")
    cert_path, key_path = Path(cert_path), Path(key_path)
    if not overwrite and cert_path.exists():
        raise KeyFileError(
            f"A certificate already exists at {cert_path}. Tessera will not replace it, because "
            "every site's invitation pins it. Move it away first if you really want a new one.",
            code="crypto.key_file",
        )

    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))

    key = ec.generate_private_key(ec.SECP256R1())
    start = (now or dt.datetime.now(dt.UTC)) - _CLOCK_SKEW
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Tessera coordinator {hosts[0]}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _CLOCK_SKEW + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(key_path, key_pem, overwrite=overwrite)
    try:
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        with contextlib.suppress(OSError):
            key_path.unlink()
        raise KeyFileError(
            f"Cannot write the certificate {cert_path}: {exc.strerror}. Check that the folder "
            "exists and that you may write to it.",
            code="crypto.key_file",
        ) from exc
    return certificate_fingerprint(cert.public_bytes(serialization.Encoding.DER))


def certificate_fingerprint(cert_pem_or_der: bytes) -> str:
    """Lower-case hex SHA-256 of the certificate's DER encoding (what invitations carry).

    For DER input this is the hash of exactly the bytes given, which is what
    ``getpeercert(binary_form=True)`` returns on the other end.
    """
    try:
        if cert_pem_or_der.lstrip().startswith(b"-----BEGIN"):
            der = x509.load_pem_x509_certificate(cert_pem_or_der).public_bytes(
                serialization.Encoding.DER
            )
        else:
            x509.load_der_x509_certificate(cert_pem_or_der)
            der = bytes(cert_pem_or_der)
    except (ValueError, TypeError) as exc:
        raise CryptoError(
            "This is not a readable certificate (expected PEM or DER). Use the certificate "
            "file the coordinator created.",
            code="crypto.tls",
        ) from exc
    return hashlib.sha256(der).hexdigest()


def fingerprint_of_file(path: str | os.PathLike[str]) -> str:
    """:func:`certificate_fingerprint` of a PEM or DER file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(
            f"Cannot read the certificate {path}: {exc.strerror}.", code="crypto.key_file"
        ) from exc
    return certificate_fingerprint(data)


def normalize_fingerprint(fingerprint: str) -> str:
    """Accept ``AB:CD:...`` or spaced or upper-case forms; return 64 lower-case hex digits."""
    text = re.sub(r"[\s:]", "", fingerprint).lower() if isinstance(fingerprint, str) else ""
    if not _HEX64.fullmatch(text):
        raise CryptoError(
            "A certificate fingerprint must be 64 hexadecimal digits (SHA-256). Copy it again "
            "from the invitation.",
            code="crypto.bad_fingerprint",
        )
    return text


# --- contexts --------------------------------------------------------------------------------


def server_ssl_context(
    cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]
) -> ssl.SSLContext:
    """Server context: TLS 1.3 only, the given certificate and key, no client certificates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(os.fspath(cert_path), os.fspath(key_path))
    except FileNotFoundError as exc:
        raise KeyFileError(
            f"The coordinator certificate or key is missing ({cert_path}, {key_path}). "
            "Run the coordinator's setup again, or restore them from your backup.",
            code="crypto.key_file",
        ) from exc
    except (OSError, ssl.SSLError) as exc:
        raise KeyFileError(
            f"Cannot use the certificate {cert_path} with the key {key_path} (unreadable, "
            "damaged, or not a matching pair). Restore both from your backup.",
            code="crypto.key_file",
        ) from exc
    return ctx


def pinned_client_ssl_context() -> ssl.SSLContext:
    """Client context for a pinned self-signed server: TLS 1.3, *no* CA or name checks.

    Safe only together with :func:`check_pin` before anything is sent: trust comes from the
    pin, and without it this context accepts any server. Prefer :func:`connect_pinned_sync`
    or :func:`connect_pinned`, which always check.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- pinning ---------------------------------------------------------------------------------


def ssl_object_of(connection: Any) -> ssl.SSLObject | ssl.SSLSocket:
    """The TLS object of a websockets client connection, sync or asyncio.

    Duck-typed, so this module does not import websockets: ``transport`` means an asyncio
    connection, ``socket`` a sync one. Raises ``ConnectionFailed`` (``net.not_tls``) for a
    connection without TLS.
    """
    obj: Any = None
    transport = getattr(connection, "transport", None)
    if transport is not None:
        obj = transport.get_extra_info("ssl_object")
    else:
        sock = getattr(connection, "socket", None)
        obj = sock if isinstance(sock, ssl.SSLSocket) else getattr(sock, "ssl_object", None)
    if not isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
        raise ConnectionFailed(
            "The connection to the coordinator is not encrypted. Use the wss:// address from "
            "the invitation.",
            code="net.not_tls",
        )
    return obj


def check_pin(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected_fingerprint: str) -> None:
    """Raise ``ConnectionFailed`` (``net.pin_mismatch``) unless the peer's certificate pins.

    Compares SHA-256 of the DER certificate the peer presented with ``expected_fingerprint``
    in constant time.
    """
    expected = bytes.fromhex(normalize_fingerprint(expected_fingerprint))
    der = ssl_object.getpeercert(binary_form=True)
    actual = hashlib.sha256(der).digest() if der else b""
    if not hmac.compare_digest(actual, expected):
        raise ConnectionFailed(
            "The coordinator's certificate does not match the one in your invitation. "
            "Someone may be intercepting the connection, or the coordinator's certificate "
            "was replaced. None of this hospital's data was sent. Do not continue: contact "
            "the coordinator's operator and compare certificate fingerprints.",
            code="net.pin_mismatch",
            presented=actual.hex(),
        )


@contextlib.contextmanager
def connect_pinned_sync(
    uri: str, fingerprint: str, **kwargs: Any
) -> Iterator[SyncClientConnection]:
    """``with connect_pinned_sync(uri, fp) as conn:``: a sync websockets connection, pin checked.

    On a mismatch the connection is closed and ``ConnectionFailed`` raised before the body
    runs. ``kwargs`` go to ``websockets.sync.client.connect`` (timeouts, limits); ``ssl`` is
    always the pinned context. A context manager because websockets 17.1 deprecated calling
    the sync ``connect()`` directly (its ``legacy=True`` opt-out does not exist before 17.1).
    """
    from websockets.sync.client import connect

    normalize_fingerprint(fingerprint)  # fail before touching the network
    with connect(uri, ssl=pinned_client_ssl_context(), **kwargs) as conn:
        try:
            check_pin(ssl_object_of(conn), fingerprint)
        except ConnectionFailed:
            conn.close_timeout = 1  # an impostor must not hold us up while closing
            raise
        yield conn


@contextlib.asynccontextmanager
async def connect_pinned(
    uri: str, fingerprint: str, *, proxy: str | None = None, **kwargs: Any
) -> AsyncIterator[AsyncClientConnection]:
    """Asyncio twin of :func:`connect_pinned_sync`: ``async with connect_pinned(...) as conn:``.

    ``proxy``: an HTTP(S) proxy's URL (``http://host:3128``), for sites whose only way out
    is a proxy. The connection is tunnelled with ``CONNECT`` (RFC 9110, section 9.3.6), so
    TLS still runs end to end with the coordinator and the pin is checked as without one.
    Without ``proxy``, websockets' default applies: ``https_proxy`` / ``HTTPS_PROXY`` for
    ``wss://`` (``http_proxy`` for ``ws://``), except for hosts in ``no_proxy``.
    """
    from websockets.asyncio.client import connect

    normalize_fingerprint(fingerprint)
    if proxy is not None:
        kwargs["proxy"] = proxy
    async with connect(uri, ssl=pinned_client_ssl_context(), **kwargs) as conn:
        try:
            check_pin(ssl_object_of(conn), fingerprint)
        except ConnectionFailed:
            conn.transport.abort()  # drop without a closing handshake with an impostor
            raise
        yield conn
