"""Expand 32-byte seeds into mask vectors with AES-256 in counter mode.

Theory of operation
-------------------
Secure aggregation (Bonawitz et al., CCS 2017, section 4) needs a pseudorandom generator that
turns a short seed into a mask as long as the model; both ends of a pair must get the same
vector, and the coordinator must get it again when it removes a dropped site's masks. AES in
counter mode is that generator (NIST SP 800-38A): the keystream for key ``seed`` and an all-
zero initial counter block, read as little-endian unsigned integers of the ring's width.
Every seed is used for one mask only (pairwise seeds are derived per run, round and pair,
self-mask seeds are fresh random bytes), so the fixed counter block never repeats a
(key, counter) pair across masks.

Speed: a mask is as long as the model (40 MB for 10M parameters) and a site expands one per
peer plus its self-mask, so expansion is the site's main cost. ``cryptography`` encrypts at
several GB/s with AES-NI when it can write into a buffer we own (``update_into``), so
:func:`apply_masks` walks the target in chunks of 256 KiB that stay in the CPU's cache: for
each chunk it writes every seed's next keystream block into one scratch buffer and adds or
subtracts it in place. Nothing as large as the model is allocated, and each target byte is
read and written once per seed from cache rather than from memory. Chunking does not change
the stream: counter mode's keystream is the same however it is cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from shared.errors import PrivacyParameterError

__all__ = ["CHUNK_BYTES", "SEED_BYTES", "apply_masks", "expand"]

SEED_BYTES = 32
CHUNK_BYTES = 256 * 1024
_BLOCK = 16
_ZEROS = bytes(CHUNK_BYTES)
_COUNTER0 = bytes(_BLOCK)


def _keystream(seed: bytes) -> CipherContext:
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        raise PrivacyParameterError(
            f"A mask seed is exactly {SEED_BYTES} bytes. This is a bug in Tessera; please "
            "report it.",
            code="privacy.bad_seed",
        )
    return Cipher(algorithms.AES(bytes(seed)), modes.CTR(_COUNTER0)).encryptor()


def _ring_view(dtype: np.dtype) -> np.dtype:
    if dtype.kind != "u":
        raise PrivacyParameterError(
            f"Masks live in unsigned integer rings (uint16, uint32, uint64), not {dtype}.",
            code="privacy.bad_parameter",
        )
    return dtype.newbyteorder("<")


def expand(seed: bytes, length: int, dtype: type[np.unsignedinteger] = np.uint32) -> np.ndarray:
    """The mask for ``seed``: ``length`` ring elements of AES-256-CTR keystream."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise PrivacyParameterError(
            f"A mask length is a whole number >= 0, not {length!r}.",
            code="privacy.bad_parameter",
        )
    out = np.zeros(length, dtype=np.dtype(dtype))
    apply_masks(out, add=[seed])
    return out


def apply_masks(
    target: np.ndarray,
    *,
    add: Sequence[bytes] = (),
    subtract: Sequence[bytes] = (),
) -> None:
    """``target += sum(expand(s) for s in add) - sum(expand(s) for s in subtract)``, in place.

    Arithmetic wraps modulo ``2**bits`` of ``target``'s unsigned dtype, which is what makes
    the masks cancel exactly. ``target`` must be a one-dimensional contiguous array.
    """
    if not isinstance(target, np.ndarray) or target.ndim != 1 or not target.flags.c_contiguous:
        raise PrivacyParameterError(
            "Masks are applied to a flat, contiguous vector. This is a bug in Tessera; please "
            "report it.",
            code="privacy.bad_parameter",
        )
    if not target.flags.writeable:
        raise PrivacyParameterError(
            "The vector to mask is read-only; pass a copy. This is a bug in Tessera; please "
            "report it.",
            code="privacy.bad_parameter",
        )
    view_dtype = _ring_view(target.dtype)
    streams = [(_keystream(s), np.add) for s in add] + [
        (_keystream(s), np.subtract) for s in subtract
    ]
    if not streams or target.size == 0:
        return
    itemsize = target.dtype.itemsize
    per_chunk = CHUNK_BYTES // itemsize
    scratch = np.empty(CHUNK_BYTES + _BLOCK, dtype=np.uint8)
    scratch_buffer = scratch.data  # update_into writes the keystream here
    zeros = memoryview(_ZEROS)
    for start in range(0, target.size, per_chunk):
        part = target[start : start + per_chunk]
        nbytes = part.size * itemsize
        mask = scratch[:nbytes].view(view_dtype)
        for ctx, op in streams:
            ctx.update_into(zeros[:nbytes], scratch_buffer)
            op(part, mask, out=part)
