"""Self-signed certificates and pinning, over real wss:// connections on loopback."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import stat
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from websockets.asyncio.client import connect as async_connect
from websockets.asyncio.server import serve
from websockets.sync.client import connect as sync_connect

from shared.crypto.tls import (
    certificate_fingerprint,
    check_pin,
    connect_pinned,
    connect_pinned_sync,
    fingerprint_of_file,
    generate_self_signed,
    normalize_fingerprint,
    pinned_client_ssl_context,
    server_ssl_context,
    ssl_object_of,
)
from shared.errors import ConnectionFailed, CryptoError, KeyFileError


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Two coordinator certificates: ``a`` is served, ``b`` is someone else's."""
    d = tmp_path_factory.mktemp("certs")
    fp_a = generate_self_signed(d / "a.crt", d / "a.key")
    fp_b = generate_self_signed(d / "b.crt", d / "b.key")
    return d, fp_a, fp_b


async def _echo(ws):
    async for message in ws:
        await ws.send(message)


@pytest.fixture
async def server_port(certs):
    d, _, _ = certs
    async with serve(
        _echo, "127.0.0.1", 0, ssl=server_ssl_context(d / "a.crt", d / "a.key")
    ) as srv:
        yield srv.sockets[0].getsockname()[1]


def test_certificate_contents(certs):
    d, fp_a, _ = certs
    cert = x509.load_pem_x509_certificate((d / "a.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= dt.timedelta(days=825)
    assert fp_a == fingerprint_of_file(d / "a.crt")
    assert fp_a == certificate_fingerprint(cert.public_bytes(serialization.Encoding.DER))
    assert len(fp_a) == 64


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_key_file_is_0600(certs):
    d, _, _ = certs
    assert stat.S_IMODE((d / "a.key").stat().st_mode) == 0o600


def test_custom_hosts_and_refusal_to_overwrite(tmp_path):
    generate_self_signed(tmp_path / "c.crt", tmp_path / "c.key", hosts=["coord.example", "::1"])
    cert = x509.load_pem_x509_certificate((tmp_path / "c.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]
    with pytest.raises(KeyFileError, match="already exists"):
        generate_self_signed(tmp_path / "c.crt", tmp_path / "c.key")


def test_certificate_fingerprint_rejects_garbage():
    with pytest.raises(CryptoError, match="not a readable certificate"):
        certificate_fingerprint(b"garbage")


def test_server_context_with_missing_files(tmp_path):
    with pytest.raises(KeyFileError, match="certificate or key is missing"):
        server_ssl_context(tmp_path / "x.crt", tmp_path / "x.key")


def test_contexts_require_tls13_and_client_skips_ca_checks():
    ctx = pinned_client_ssl_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.check_hostname is False
    assert ctx.verify_mode == ssl.CERT_NONE


def test_normalize_fingerprint():
    fp = "ab" * 32
    assert normalize_fingerprint(":".join(["AB"] * 32)) == fp
    with pytest.raises(CryptoError, match="64 hexadecimal digits"):
        normalize_fingerprint("ab" * 31)


# --- real handshakes -------------------------------------------------------------------------


async def test_sync_client_pin_matches(certs, server_port):
    _, fp_a, _ = certs

    def talk():
        with sync_connect(f"wss://127.0.0.1:{server_port}", ssl=pinned_client_ssl_context()) as c:
            assert isinstance(c.socket, ssl.SSLSocket)
            assert ssl_object_of(c) is c.socket
            check_pin(ssl_object_of(c), fp_a)
            c.send("hello")
            return c.recv(timeout=5)

    assert await asyncio.to_thread(talk) == "hello"


async def test_sync_client_pin_mismatch(certs, server_port):
    _, _, fp_b = certs

    def talk():
        with sync_connect(f"wss://127.0.0.1:{server_port}", ssl=pinned_client_ssl_context()) as c:
            check_pin(ssl_object_of(c), fp_b)

    with pytest.raises(ConnectionFailed, match="does not match the one in your invitation") as e:
        await asyncio.to_thread(talk)
    assert e.value.code == "net.pin_mismatch"


async def test_asyncio_client_pin_matches_and_mismatches(certs, server_port):
    _, fp_a, fp_b = certs
    uri = f"wss://127.0.0.1:{server_port}"
    async with async_connect(uri, ssl=pinned_client_ssl_context()) as c:
        obj = ssl_object_of(c)
        assert obj is c.transport.get_extra_info("ssl_object")
        assert isinstance(obj, ssl.SSLObject)
        assert obj.version() == "TLSv1.3"
        check_pin(obj, fp_a)
        with pytest.raises(ConnectionFailed, match="does not match") as e:
            check_pin(obj, fp_b)
        assert e.value.code == "net.pin_mismatch"


async def test_connect_pinned_helpers(certs, server_port):
    _, fp_a, fp_b = certs
    uri = f"wss://127.0.0.1:{server_port}"

    async with connect_pinned(uri, fp_a.upper()) as c:
        await c.send("hi")
        assert await c.recv() == "hi"
    with pytest.raises(ConnectionFailed, match="does not match"):
        async with connect_pinned(uri, fp_b):
            pytest.fail("the body must not run after a pin mismatch")

    def sync_ok():
        with connect_pinned_sync(uri, fp_a) as c:
            c.send("hi")
            return c.recv(timeout=5)

    assert await asyncio.to_thread(sync_ok) == "hi"

    def sync_mismatch():
        with connect_pinned_sync(uri, fp_b):
            pytest.fail("the body must not run after a pin mismatch")

    with pytest.raises(ConnectionFailed, match="does not match"):
        await asyncio.to_thread(sync_mismatch)


async def test_plain_ws_connection_is_not_tls():
    async with serve(_echo, "127.0.0.1", 0) as srv:
        port = srv.sockets[0].getsockname()[1]
        async with async_connect(f"ws://127.0.0.1:{port}") as c:
            with pytest.raises(ConnectionFailed, match="not encrypted") as e:
                ssl_object_of(c)
            assert e.value.code == "net.not_tls"


async def test_default_client_context_rejects_self_signed(certs, server_port):
    """Sanity: without the pinned context, CA verification fails, so pinning is what trusts."""
    with pytest.raises(ssl.SSLCertVerificationError):
        async with async_connect(f"wss://127.0.0.1:{server_port}"):
            pass
