"""Mask expansion with AES-256-CTR."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from shared.errors import PrivacyParameterError
from shared.privacy.prg import CHUNK_BYTES, apply_masks, expand

SEED = bytes(range(32))


def _keystream(seed: bytes, nbytes: int) -> bytes:
    return Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(nbytes))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("extra", [-1, 0, 1, CHUNK_BYTES])
def test_mask_is_the_aes_ctr_keystream_however_it_is_chunked(dtype: type, extra: int) -> None:
    item = np.dtype(dtype).itemsize
    length = CHUNK_BYTES // item + extra // item + (extra > 0) - (extra < 0)
    got = expand(SEED, length, dtype)
    want = np.frombuffer(_keystream(SEED, length * item), dtype=np.dtype(dtype).newbyteorder("<"))
    np.testing.assert_array_equal(got, want)


def test_masks_differ_per_seed_and_look_uniform() -> None:
    a, b = expand(SEED, 50_000), expand(bytes(32), 50_000)
    assert np.mean(a == b) < 1e-3
    assert (a / 2**32).mean() == pytest.approx(0.5, abs=0.01)


def test_add_then_subtract_restores_the_vector_exactly_modulo_two_to_the_bits() -> None:
    seeds = [bytes([i]) * 32 for i in range(5)]
    original = np.arange(100_000, dtype=np.uint32) * 40_000  # wraps already
    target = original.copy()
    apply_masks(target, add=seeds[:3], subtract=seeds[3:])
    assert np.mean(target == original) < 1e-3
    expected = original.copy()
    for s in seeds[:3]:
        expected += expand(s, target.size)
    for s in seeds[3:]:
        expected -= expand(s, target.size)
    np.testing.assert_array_equal(target, expected)
    apply_masks(target, add=seeds[3:], subtract=seeds[:3])
    np.testing.assert_array_equal(target, original)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: expand(b"short", 4), "exactly 32 bytes"),
        (lambda: expand(SEED, -1), "length is a whole number >= 0"),
        (lambda: apply_masks(np.zeros(4, np.int32), add=[SEED]), "unsigned integer rings"),
        (lambda: apply_masks(np.zeros((2, 2), np.uint32), add=[SEED]), "flat, contiguous"),
        (lambda: apply_masks(np.zeros(8, np.uint32)[::2], add=[SEED]), "flat, contiguous"),
    ],
)
def test_invalid_arguments(call, match: str) -> None:
    with pytest.raises(PrivacyParameterError, match=match):
        call()
