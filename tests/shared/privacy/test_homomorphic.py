"""CKKS aggregation building blocks: sums, key distribution, packing, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shared.errors import HomomorphicError
from shared.privacy.homomorphic import (
    CKKSParams,
    EncryptedUpdate,
    aggregate_encrypted,
    decode_encrypted,
    decrypt_update,
    encode_encrypted,
    encrypt_update,
    generate_context,
    open_secret_context,
    public_context,
    seal_secret_context,
)

SLOTS = 4096  # the default degree 8192, also the tests' degree
TOL = 1e-4  # CKKS at scale 2**40 on values of unit size: errors are about 1e-6


@pytest.fixture(scope="module")
def secret() -> bytes:
    return generate_context()


def _updates(n: int, length: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, 0.1, length).astype(np.float32) for _ in range(n)]


def test_the_decrypted_sum_is_the_plain_sum_within_ckks_precision(secret: bytes) -> None:
    updates = _updates(3, 100_000)
    encrypted = [encrypt_update(secret, u) for u in updates]
    total = aggregate_encrypted(public_context(secret), encrypted)
    got = decrypt_update(secret, total)
    assert got.dtype == np.float32 and got.shape == (100_000,)
    np.testing.assert_allclose(got, np.sum(updates, axis=0, dtype=np.float64), atol=TOL, rtol=0)


def test_the_weighted_sum_uses_plain_scalar_weights(secret: bytes) -> None:
    updates = _updates(3, 10_000, seed=1)
    counts = np.array([120.0, 40.0, 840.0])
    weights = counts / counts.sum()
    encrypted = [encrypt_update(secret, u) for u in updates]
    total = aggregate_encrypted(public_context(secret), encrypted, weights=list(weights))
    expected = sum(w * u.astype(np.float64) for w, u in zip(weights, updates, strict=True))
    np.testing.assert_allclose(decrypt_update(secret, total), expected, atol=TOL, rtol=0)


def test_a_long_vector_is_packed_over_many_ciphertexts_and_round_trips(secret: bytes) -> None:
    length = 3 * SLOTS + 17  # the last ciphertext is partly filled
    (update,) = _updates(1, length, seed=2)
    encrypted = encrypt_update(secret, update)
    assert len(encrypted.chunks) == 4 and encrypted.slots == SLOTS
    wire = decode_encrypted(encode_encrypted(encrypted), max_length=length)
    assert wire == encrypted
    np.testing.assert_allclose(decrypt_update(secret, wire), update, atol=TOL, rtol=0)


def test_an_imaging_sized_update_of_over_a_million_values_sums(secret: bytes) -> None:
    length = 1_100_000  # 269 ciphertexts: one layer of an imaging model
    updates = _updates(2, length, seed=3)
    encrypted = [encrypt_update(secret, u) for u in updates]
    assert len(encrypted[0].chunks) == -(-length // SLOTS)
    wire = [decode_encrypted(encode_encrypted(e)) for e in encrypted]
    total = decrypt_update(secret, aggregate_encrypted(public_context(secret), wire))
    np.testing.assert_allclose(total, updates[0] + updates[1], atol=TOL, rtol=0)


def test_the_coordinators_context_has_no_secret_key_and_cannot_decrypt(secret: bytes) -> None:
    public = public_context(secret)
    context = ts.context_from(public)
    assert not context.has_secret_key() and context.is_public()
    total = aggregate_encrypted(public, [encrypt_update(secret, np.ones(10, np.float32))])
    vector = ts.ckks_vector_from(context, total.chunks[0])
    with pytest.raises(ValueError, match="secret_key"):
        vector.decrypt()
    with pytest.raises(HomomorphicError, match="no secret key") as info:
        decrypt_update(public, total)
    assert info.value.code == "privacy.he.secret_key"


def test_the_coordinator_refuses_a_context_holding_the_secret_key(secret: bytes) -> None:
    encrypted = encrypt_update(secret, np.ones(10, np.float32))
    with pytest.raises(HomomorphicError, match="holds the secret key") as info:
        aggregate_encrypted(secret, [encrypted])
    assert info.value.code == "privacy.he.secret_key"


def _sites() -> tuple[X25519PrivateKey, X25519PrivateKey, X25519PrivateKey]:
    return X25519PrivateKey.generate(), X25519PrivateKey.generate(), X25519PrivateKey.generate()


def test_the_secret_context_reaches_another_site_sealed_to_its_key(secret: bytes) -> None:
    key_site, other, _ = _sites()
    blob = seal_secret_context(
        secret, sender=key_site, recipient=other.public_key(), run_id="run-1"
    )
    assert secret not in blob
    opened = open_secret_context(
        blob, recipient=other, sender=key_site.public_key(), run_id="run-1"
    )
    assert opened == secret
    update = np.linspace(-1, 1, 50, dtype=np.float32)
    # what one site encrypts, the other decrypts: they share the key
    got = decrypt_update(opened, encrypt_update(secret, update))
    np.testing.assert_allclose(got, update, atol=TOL, rtol=0)


def test_a_tampered_or_misdirected_key_blob_is_rejected(secret: bytes) -> None:
    key_site, other, stranger = _sites()
    blob = seal_secret_context(
        secret, sender=key_site, recipient=other.public_key(), run_id="run-1"
    )
    tampered = bytearray(blob)
    tampered[len(blob) // 2] ^= 0x01
    attempts = [
        dict(blob=bytes(tampered), recipient=other, sender=key_site.public_key(), run_id="run-1"),
        dict(blob=blob, recipient=stranger, sender=key_site.public_key(), run_id="run-1"),
        dict(blob=blob, recipient=other, sender=stranger.public_key(), run_id="run-1"),
        dict(blob=blob, recipient=other, sender=key_site.public_key(), run_id="run-2"),
        dict(blob=blob[:40], recipient=other, sender=key_site.public_key(), run_id="run-1"),
    ]
    for kwargs in attempts:
        with pytest.raises(HomomorphicError, match="ask the key site") as info:
            open_secret_context(**kwargs)  # type: ignore[arg-type]
        assert info.value.code == "privacy.he.key_rejected"


def test_a_coordinator_cannot_substitute_a_key_of_its_own(secret: bytes) -> None:
    """A coordinator that made its own key cannot seal it as if from the key site."""
    key_site, other, coordinator = _sites()
    forged = seal_secret_context(
        generate_context(), sender=coordinator, recipient=other.public_key(), run_id="run-1"
    )
    with pytest.raises(HomomorphicError, match="does not open") as info:
        open_secret_context(forged, recipient=other, sender=key_site.public_key(), run_id="run-1")
    assert info.value.code == "privacy.he.key_rejected"


def test_updates_of_different_shapes_are_not_added(secret: bytes) -> None:
    public = public_context(secret)
    a = encrypt_update(secret, np.zeros(SLOTS + 1, np.float32))
    b = encrypt_update(secret, np.zeros(SLOTS + 2, np.float32))
    with pytest.raises(HomomorphicError, match="same model") as info:
        aggregate_encrypted(public, [a, b])
    assert info.value.code == "privacy.he.shape_mismatch"
    # same header, but a ciphertext that holds the wrong number of values
    swapped = EncryptedUpdate(length=a.length, slots=a.slots, chunks=(a.chunks[1], a.chunks[0]))
    with pytest.raises(HomomorphicError, match="not what its length says") as info:
        aggregate_encrypted(public, [a, swapped])
    assert info.value.code == "privacy.he.shape_mismatch"
    with pytest.raises(HomomorphicError, match="one finite weight per update"):
        aggregate_encrypted(public, [a, a], weights=[1.0])


def test_bytes_that_are_not_an_encrypted_update_are_refused(secret: bytes) -> None:
    encrypted = encrypt_update(secret, np.ones(SLOTS + 5, np.float32))
    wire = encode_encrypted(encrypted)
    cases = {
        wire[:10]: "truncated",
        b"XXXXXXXX" + wire[8:]: "not a Tessera encrypted update",
        wire[:-1]: "truncated",
        wire + b"\0": "trailing bytes",
    }
    for data, message in cases.items():
        with pytest.raises(HomomorphicError, match=message):
            decode_encrypted(data)
    with pytest.raises(HomomorphicError, match="the model has 100") as info:
        decode_encrypted(wire, max_length=100)
    assert info.value.code == "privacy.he.shape_mismatch"
    garbage = EncryptedUpdate(
        length=encrypted.length, slots=encrypted.slots, chunks=(b"\x01" * 64, encrypted.chunks[1])
    )
    with pytest.raises(HomomorphicError, match="not a CKKS ciphertext") as info:
        aggregate_encrypted(public_context(secret), [encrypted, garbage])
    assert info.value.code == "privacy.he.malformed"


def test_non_finite_or_non_flat_updates_and_weak_parameters_are_refused(secret: bytes) -> None:
    with pytest.raises(HomomorphicError, match="training diverged"):
        encrypt_update(secret, np.array([1.0, np.nan], np.float32))
    with pytest.raises(HomomorphicError, match="flatten the update"):
        encrypt_update(secret, np.ones((2, 2), np.float32))
    with pytest.raises(HomomorphicError, match="128-bit"):
        CKKSParams(coeff_mod_bit_sizes=(60, 60, 60, 60))
    with pytest.raises(HomomorphicError, match="poly_modulus_degree"):
        CKKSParams(poly_modulus_degree=4096)
