"""Ed25519 key files and public-key text."""

from __future__ import annotations

import os
import stat
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from shared.crypto.keys import (
    b64url_decode,
    b64url_encode,
    generate_signing_key,
    key_fingerprint,
    load_private_key,
    public_key_b64,
    public_key_from_b64,
    save_private_key,
)
from shared.errors import CryptoError, KeyFileError

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")


def _raw(key):
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@posix_only
@pytest.mark.parametrize("passphrase", [None, b"correct horse"])
def test_key_file_is_0600_even_with_a_permissive_umask(tmp_path, passphrase):
    old = os.umask(0)
    try:
        save_private_key(generate_signing_key(), tmp_path / "site.pem", passphrase)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "site.pem").stat().st_mode) == 0o600


@posix_only
def test_overwritten_key_file_is_0600_and_no_temp_file_is_left(tmp_path):
    path = tmp_path / "site.pem"
    save_private_key(generate_signing_key(), path)
    os.chmod(path, 0o644)
    new = generate_signing_key()
    save_private_key(new, path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _raw(load_private_key(path)) == _raw(new)
    assert [p.name for p in tmp_path.iterdir()] == ["site.pem"]


def test_round_trip_without_passphrase(tmp_path):
    key = generate_signing_key()
    save_private_key(key, tmp_path / "k.pem")
    assert (tmp_path / "k.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert _raw(load_private_key(tmp_path / "k.pem")) == _raw(key)


def test_round_trip_with_passphrase(tmp_path):
    key = generate_signing_key()
    save_private_key(key, tmp_path / "k.pem", b"s3cret")
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "k.pem").read_bytes()
    assert _raw(load_private_key(tmp_path / "k.pem", b"s3cret")) == _raw(key)


def test_wrong_passphrase(tmp_path):
    save_private_key(generate_signing_key(), tmp_path / "k.pem", b"s3cret")
    with pytest.raises(KeyFileError, match="Wrong passphrase") as info:
        load_private_key(tmp_path / "k.pem", b"nope")
    assert info.value.code == "crypto.key_file"


def test_missing_passphrase(tmp_path):
    save_private_key(generate_signing_key(), tmp_path / "k.pem", b"s3cret")
    with pytest.raises(KeyFileError, match="protected by a passphrase"):
        load_private_key(tmp_path / "k.pem")


def test_empty_passphrase_is_refused(tmp_path):
    with pytest.raises(KeyFileError, match="passphrase is empty"):
        save_private_key(generate_signing_key(), tmp_path / "k.pem", b"")
    assert not (tmp_path / "k.pem").exists()


def test_missing_file(tmp_path):
    with pytest.raises(KeyFileError, match="No key file at") as info:
        load_private_key(tmp_path / "absent.pem")
    assert info.value.code == "crypto.key_file"


def test_garbage_file(tmp_path):
    (tmp_path / "k.pem").write_bytes(b"hello")
    with pytest.raises(KeyFileError, match="not a readable private key"):
        load_private_key(tmp_path / "k.pem")


def test_not_an_ed25519_key(tmp_path):
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "k.pem").write_bytes(pem)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        load_private_key(tmp_path / "k.pem")


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "k.pem"
    first = generate_signing_key()
    save_private_key(first, path)
    with pytest.raises(KeyFileError, match="already exists"):
        save_private_key(generate_signing_key(), path)
    assert _raw(load_private_key(path)) == _raw(first)


@posix_only
def test_does_not_follow_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (tmp_path / "k.pem").symlink_to(victim)
    with pytest.raises(KeyFileError, match="already exists"):
        save_private_key(generate_signing_key(), tmp_path / "k.pem")
    assert victim.read_bytes() == b"keep me"


def test_public_key_text_round_trip():
    key = generate_signing_key()
    text = public_key_b64(key)
    assert len(text) == 43
    assert public_key_b64(key.public_key()) == text
    assert _raw(key) == public_key_from_b64(text).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


@pytest.mark.parametrize(
    "text",
    ["", "not base64!", "A" * 42, "A" * 44, "A" * 43 + "=", " " + "A" * 43, 42, None],
)
def test_public_key_garbage(text):
    with pytest.raises(CryptoError, match="not a Tessera public key") as info:
        public_key_from_b64(text)
    assert info.value.code == "crypto.bad_public_key"


def test_public_key_non_canonical_spelling_is_rejected():
    text = public_key_b64(generate_signing_key())
    # Flip the unused low bits of the last character: same bytes, different text.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(text[-1])
    twin = text[:-1] + alphabet[last ^ 1]
    with pytest.raises(CryptoError, match="not a Tessera public key"):
        public_key_from_b64(twin)


def test_fingerprint():
    key = generate_signing_key()
    fp = key_fingerprint(key)
    assert fp == key_fingerprint(key.public_key())
    assert len(fp) == 16
    assert int(fp, 16) >= 0
    assert fp != key_fingerprint(generate_signing_key())


@given(st.binary(max_size=100))
def test_b64url_round_trip(data):
    assert b64url_decode(b64url_encode(data)) == data


@given(st.text(max_size=60))
def test_b64url_decode_never_raises(text):
    data = b64url_decode(text)
    assert data is None or b64url_encode(data) == text
