"""Homomorphic-encryption aggregation: CKKS building blocks (TenSEAL), sans I/O.

Theory of operation
-------------------
An alternative to secure aggregation by masking (``secagg``): the sites share one CKKS key
(Cheon, Kim, Kim and Song, ASIACRYPT 2017, "Homomorphic Encryption for Arithmetic of
Approximate Numbers"; SEAL via TenSEAL, Benaissa et al. 2021) that the coordinator never holds,
each site encrypts its update, the coordinator adds the ciphertexts (weighted by plain scalars)
without being able to read any of them, and the sites decrypt the sum::

    key site     generate_context() -> secret context (secret key, public key, parameters)
                 seal_secret_context(..., recipient=each other site) -> sealed blobs
                 public_context() -> parameters only, for the coordinator
    coordinator  relays the sealed blobs (it cannot open them) and keeps the public context
    every site   open_secret_context() -> the same secret context
                 encrypt_update(update) -> EncryptedUpdate -> encode_encrypted() -> bytes
    coordinator  decode_encrypted(); aggregate_encrypted(public, updates, weights)
    every site   decrypt_update(secret, aggregate) -> float32 weighted sum

**Key distribution.** A sealed blob is the secret context encrypted with AES-256-GCM under a
key from HKDF-SHA256 (RFC 5869) over two X25519 agreements (RFC 7748): an ephemeral key with
the recipient's key (fresh per blob) and the key site's static key with the recipient's key.
The second authenticates the sender, as in HPKE's Auth mode (RFC 9180): a coordinator that
swapped in a key of its own making could not produce a blob that opens, so it cannot get sites
to encrypt under a key it knows. The run id is GCM's associated data, and both public keys are
in the HKDF info, so a blob is useless for another run, recipient or sender. The X25519 keys are
the sites' own (how they are published and signed is the caller's business).

**Packing.** A CKKS ciphertext holds ``poly_modulus_degree / 2`` real slots; an update of n
floats is cut into ``ceil(n / slots)`` ciphertexts in order, the last one padded with zeros,
so imaging-sized layers (millions of weights) work, unlike frameworks that put a layer in one
ciphertext. Everything crosses process boundaries as bytes: TenSEAL's protocol-buffer
serialisation framed by :func:`encode_encrypted`, never pickle.

**Precision and levels.** The default parameters (degree 8192, coefficient primes 60-40-60
bits, scale 2**40) give 128-bit security (the HE standard allows 218 bits at 8192) and one
rescaling level: enough for one multiplication by a plain weight. CKKS is approximate: a
decrypted sum is within about 1e-6 of the exact one for updates of unit size. After a
weighted sum the modulus left is 60 bits at scale 2**40, so weighted sums must stay below
about 2**18 in magnitude: use normalised weights (sample counts over their total), which keep
the result a weighted average. Unweighted sums consume no level.

Errors are :class:`~shared.errors.HomomorphicError` with the codes listed there; TenSEAL's own
exceptions never escape, except the one a secret-key-less context raises on ``decrypt`` (the
proof that the coordinator cannot read what it adds).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.errors import HomomorphicError

__all__ = [
    "CKKSParams",
    "EncryptedUpdate",
    "aggregate_encrypted",
    "decode_encrypted",
    "decrypt_update",
    "encode_encrypted",
    "encrypt_update",
    "generate_context",
    "open_secret_context",
    "public_context",
    "seal_secret_context",
]

_SEAL_MAGIC = b"TSHEKEY1"
BLOB_MAGIC = b"TSHECT01"
_HKDF_INFO = b"tessera/he-secret-context/v1"
_NONCE = 12
_X25519 = 32
# Ciphertexts are at most a few MB even at degree 32768; anything bigger is not ours.
_MAX_CHUNK_BYTES = 64 << 20
_MAX_SEALED_BYTES = 256 << 20
# SEAL's limits on the total coefficient modulus for 128-bit security (HE standard, 2018).
_MAX_COEFF_BITS = {8192: 218, 16384: 438, 32768: 881}


def _tenseal() -> Any:
    # Imported on first use: the native library is only needed by federations in HE mode.
    import tenseal

    return tenseal


def _error(code: str, message: str) -> HomomorphicError:
    return HomomorphicError(message, code=f"privacy.he.{code}")


# -- parameters and contexts ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CKKSParams:
    """CKKS settings: ``poly_modulus_degree`` (8192, 16384 or 32768; slots are half of it),
    ``coeff_mod_bit_sizes`` (first and last primes bound the precision left after rescaling,
    the middle ones are the scale's levels), and ``scale_bits`` (values are encoded times
    2**scale_bits). Refused unless 128-bit secure and able to take one weighted sum."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40

    def __post_init__(self) -> None:
        degree = self.poly_modulus_degree
        if degree not in _MAX_COEFF_BITS:
            raise _error(
                "bad_parameter",
                f"poly_modulus_degree must be one of {sorted(_MAX_COEFF_BITS)}, not {degree!r}.",
            )
        sizes = tuple(self.coeff_mod_bit_sizes)
        object.__setattr__(self, "coeff_mod_bit_sizes", sizes)
        if (
            len(sizes) < 3
            or not all(isinstance(b, int) and 20 <= b <= 60 for b in sizes)
            or sum(sizes) > _MAX_COEFF_BITS[degree]
        ):
            raise _error(
                "bad_parameter",
                f"coeff_mod_bit_sizes {sizes!r} must be at least three primes of 20 to 60 bits "
                f"totalling at most {_MAX_COEFF_BITS[degree]} bits at degree {degree} (128-bit "
                "security), e.g. (60, 40, 60).",
            )
        if not (isinstance(self.scale_bits, int) and 20 <= self.scale_bits <= min(sizes[1:-1])):
            raise _error(
                "bad_parameter",
                f"scale_bits must be an integer from 20 to the middle primes' size "
                f"({min(sizes[1:-1])}), not {self.scale_bits!r}.",
            )

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2


def generate_context(params: CKKSParams | None = None) -> bytes:
    """A fresh CKKS key at the key site: the serialised secret context (secret key, public key
    and parameters). It must leave the site only sealed (:func:`seal_secret_context`)."""
    ts = _tenseal()
    params = params or CKKSParams()
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        n_threads=1,
    )
    context.global_scale = float(2**params.scale_bits)
    # Only additions and plain-scalar products are needed: no relinearisation or Galois keys.
    return bytes(
        context.serialize(
            save_public_key=True,
            save_secret_key=True,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )


def load_context(data: bytes, *, secret: bool) -> Any:
    """A TenSEAL context from bytes, with (``secret``) or without its secret key: either
    way is enforced, so a secret context never passes for the coordinator's."""
    ts = _tenseal()
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _error("malformed", f"A CKKS context must be bytes, not {type(data).__name__}.")
    try:
        context = ts.context_from(bytes(data), n_threads=1)
    except Exception as exc:  # TenSEAL raises assorted native errors on bad bytes
        raise _error(
            "malformed", "These bytes are not a CKKS context; ask the key site for it again."
        ) from exc
    if context.has_secret_key() != secret:
        if secret:
            raise _error(
                "secret_key",
                "This CKKS context has no secret key, so it cannot encrypt for or decrypt the "
                "federation; use the secret context sealed to this site.",
            )
        raise _error(
            "secret_key",
            "This CKKS context holds the secret key; the coordinator must only ever get the "
            "public context (public_context()).",
        )
    return context


def key_id(secret_context: bytes) -> str:
    """Which key a secret context holds, as a digest that reveals nothing of it: public
    contexts only carry the parameters, so two keys of the same parameters have the same
    public context, and sites prove they hold the same key by this instead."""
    return hashlib.sha256(b"tessera.he.key-id\x00" + bytes(secret_context)).hexdigest()


def public_context(secret_context: bytes) -> bytes:
    """The parameters alone, for the coordinator: no secret key (and no public key, which it
    does not need to add ciphertexts), so it can neither decrypt nor encrypt."""
    context = load_context(secret_context, secret=True)
    return bytes(
        context.serialize(
            save_public_key=False,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )


# -- sealing the secret context to each site ----------------------------------------------


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _seal_key(
    ephemeral_secret: bytes,
    static_secret: bytes,
    *,
    ephemeral: bytes,
    sender: bytes,
    recipient: bytes,
) -> bytes:
    info = _HKDF_INFO + ephemeral + sender + recipient
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
        ephemeral_secret + static_secret
    )


def _aad(run_id: str) -> bytes:
    if not isinstance(run_id, str) or not run_id:
        raise _error(
            "bad_parameter", "The run id that binds the key blob must be a non-empty string."
        )
    return _SEAL_MAGIC + run_id.encode("utf-8")


def seal_secret_context(
    secret_context: bytes,
    *,
    sender: X25519PrivateKey,
    recipient: X25519PublicKey,
    run_id: str,
) -> bytes:
    """The secret context encrypted to ``recipient`` by the key site ``sender`` for ``run_id``:
    ``magic || ephemeral public key || nonce || AES-256-GCM ciphertext``. Only the recipient
    can open it, and only with the sender's public key and the same run id."""
    load_context(secret_context, secret=True)  # never seal something that is not a key
    aad = _aad(run_id)
    ephemeral = X25519PrivateKey.generate()
    eph_pub = _raw(ephemeral.public_key())
    key = _seal_key(
        ephemeral.exchange(recipient),
        sender.exchange(recipient),
        ephemeral=eph_pub,
        sender=_raw(sender.public_key()),
        recipient=_raw(recipient),
    )
    nonce = os.urandom(_NONCE)
    return _SEAL_MAGIC + eph_pub + nonce + AESGCM(key).encrypt(nonce, secret_context, aad)


def open_secret_context(
    blob: bytes,
    *,
    recipient: X25519PrivateKey,
    sender: X25519PublicKey,
    run_id: str,
) -> bytes:
    """The secret context from a blob made by :func:`seal_secret_context`. A blob for another
    site, run or sender, or one altered on the way, raises ``privacy.he.key_rejected``."""
    aad = _aad(run_id)
    head = len(_SEAL_MAGIC) + _X25519 + _NONCE
    if (
        not isinstance(blob, bytes | bytearray)
        or len(blob) <= head + 16
        or len(blob) > _MAX_SEALED_BYTES
        or not bytes(blob).startswith(_SEAL_MAGIC)
    ):
        raise _error(
            "key_rejected",
            "The sealed CKKS key is not in Tessera's format; ask the key site to send it again.",
        )
    blob = bytes(blob)
    eph_pub = blob[len(_SEAL_MAGIC) : len(_SEAL_MAGIC) + _X25519]
    nonce = blob[len(_SEAL_MAGIC) + _X25519 : head]
    try:
        ephemeral = X25519PublicKey.from_public_bytes(eph_pub)
        key = _seal_key(
            recipient.exchange(ephemeral),
            recipient.exchange(sender),
            ephemeral=eph_pub,
            sender=_raw(sender),
            recipient=_raw(recipient.public_key()),
        )
        secret_context = AESGCM(key).decrypt(nonce, blob[head:], aad)
    except (InvalidTag, ValueError) as exc:
        raise _error(
            "key_rejected",
            "The sealed CKKS key does not open with this site's key for this run and key site: "
            "it was altered, or made for another site, run or sender. It was not used; ask "
            "the key site to send it again.",
        ) from exc
    load_context(secret_context, secret=True)
    return secret_context


# -- encrypted updates -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedUpdate:
    """A flat update of ``length`` floats, encrypted as ``ceil(length / slots)`` serialised
    CKKS ciphertexts of ``slots`` values each (the last zero-padded), in order."""

    length: int
    slots: int
    chunks: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not (isinstance(self.length, int) and self.length >= 1):
            raise _error(
                "malformed", f"An encrypted update's length must be >= 1, not {self.length!r}."
            )
        if not (isinstance(self.slots, int) and self.slots >= 1):
            raise _error(
                "malformed", f"An encrypted update's slot count is invalid: {self.slots!r}."
            )
        object.__setattr__(self, "chunks", tuple(self.chunks))
        expected = -(-self.length // self.slots)
        if len(self.chunks) != expected:
            raise _error(
                "shape_mismatch",
                f"An update of {self.length} values at {self.slots} slots needs {expected} "
                f"ciphertexts, not {len(self.chunks)}.",
            )
        if not all(isinstance(c, bytes) and 0 < len(c) <= _MAX_CHUNK_BYTES for c in self.chunks):
            raise _error("malformed", "An encrypted update holds an empty or oversized ciphertext.")

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)


def encrypt_update(secret_context: bytes, update: np.ndarray) -> EncryptedUpdate:
    """Encrypt a flat float32 (or float64) update under the federation's key, packed over as
    many ciphertexts as it needs. Non-finite values are refused: CKKS would encrypt them as
    garbage that poisons the whole sum."""
    context = load_context(secret_context, secret=True)
    ts = _tenseal()
    flat = np.asarray(update)
    if flat.ndim != 1 or flat.size == 0 or not np.issubdtype(flat.dtype, np.floating):
        raise _error(
            "bad_parameter",
            f"Only a non-empty flat float vector can be encrypted, not shape {flat.shape} of "
            f"{flat.dtype}; flatten the update first.",
        )
    if not np.all(np.isfinite(flat)):
        raise _error("bad_parameter", "The update holds NaN or infinite values; training diverged.")
    slots = context.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2
    chunks = tuple(
        bytes(ts.ckks_vector(context, flat[start : start + slots].astype(np.float64)).serialize())
        for start in range(0, flat.size, slots)
    )
    return EncryptedUpdate(length=int(flat.size), slots=slots, chunks=chunks)


def max_ciphertext_bytes(context: Any) -> int:
    """An upper bound on one serialised ciphertext under ``context``'s parameters: two
    polynomials of ``poly_modulus_degree`` coefficients over at most the standard's modulus
    bits, plus framing. It bounds what a peer may send before anything is parsed."""
    degree = context.seal_context().data.first_context_data().parms().poly_modulus_degree()
    return _ciphertext_bound(degree)


def max_encrypted_bytes(length: int, params: CKKSParams | None = None) -> int:
    """An upper bound on an encrypted vector of ``length`` values on the wire (framed by
    :func:`encode_encrypted`), from the parameters alone: what a plan's uploads can take."""
    degree = (params or CKKSParams()).poly_modulus_degree
    count = -(-length // (degree // 2))
    return _HEADER.size + count * (4 + _ciphertext_bound(degree))


def _ciphertext_bound(degree: int) -> int:
    return 2 * degree * math.ceil(_MAX_COEFF_BITS[degree] / 8) + 4096


def load_vector(context: Any, data: bytes, who: str) -> Any:
    """A CKKS ciphertext from a peer's bytes under ``context``; ``who`` names it in the error."""
    ts = _tenseal()
    try:
        return ts.ckks_vector_from(context, data)
    except Exception as exc:  # TenSEAL raises assorted native errors on bad bytes
        raise _error(
            "malformed",
            f"{who} holds bytes that are not a CKKS ciphertext under this federation's "
            "parameters; it was not used.",
        ) from exc


def aggregate_encrypted(
    context: bytes,
    updates: Sequence[EncryptedUpdate],
    weights: Sequence[float] | None = None,
) -> EncryptedUpdate:
    """``sum_i weights[i] * updates[i]`` (plain sum without ``weights``), ciphertext by
    ciphertext, with the coordinator's public context: no secret key is involved or accepted.
    Weights are plain scalars, e.g. sample counts over their total (see the module's note on
    precision). Updates must agree in length and packing, else ``privacy.he.shape_mismatch``.
    The updates are added in the order given: CKKS sums are approximate, so callers that need
    the same bytes on replay pass them in a canonical order (by site id)."""
    public = load_context(context, secret=False)
    if not updates:
        raise _error("bad_parameter", "There are no encrypted updates to add.")
    first = updates[0]
    for i, update in enumerate(updates):
        if (update.length, update.slots) != (first.length, first.slots):
            raise _error(
                "shape_mismatch",
                f"Encrypted update {i} has {update.length} values in ciphertexts of "
                f"{update.slots} slots, but update 0 has {first.length} in {first.slots}; "
                "every site must encrypt the same model with the same key.",
            )
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != len(updates) or not all(math.isfinite(w) for w in weights):
            raise _error(
                "bad_parameter",
                f"Give one finite weight per update ({len(updates)}), not {len(weights)}.",
            )
    chunks: list[bytes] = []
    for k in range(len(first.chunks)):
        total = None
        for i, update in enumerate(updates):
            vector = load_vector(public, update.chunks[k], f"Encrypted update {i}")
            if vector.size() != min(first.slots, first.length - k * first.slots):
                raise _error(
                    "shape_mismatch",
                    f"Ciphertext {k} of encrypted update {i} holds {vector.size()} values, "
                    "not what its length says; it was not used.",
                )
            try:
                if weights is not None:
                    vector = vector * weights[i]
                total = vector if total is None else total + vector
            except Exception as exc:  # e.g. a ciphertext at another scale or level
                raise _error(
                    "malformed",
                    f"Ciphertext {k} of encrypted update {i} cannot be added to the others (its "
                    "scale or level differs: not a fresh encryption); it was not used.",
                ) from exc
        assert total is not None
        chunks.append(bytes(total.serialize()))
    return EncryptedUpdate(length=first.length, slots=first.slots, chunks=tuple(chunks))


def decrypt_update(secret_context: bytes, update: EncryptedUpdate) -> np.ndarray:
    """The float32 vector an encrypted update (usually the aggregate) holds; needs the
    secret context, which only the sites have."""
    context = load_context(secret_context, secret=True)
    out = np.empty(update.length, dtype=np.float32)
    for k, chunk in enumerate(update.chunks):
        start = k * update.slots
        stop = min(start + update.slots, update.length)
        values = load_vector(context, chunk, "The encrypted aggregate").decrypt()
        if len(values) != stop - start:
            raise _error(
                "shape_mismatch",
                f"Ciphertext {k} decrypts to {len(values)} values, not {stop - start}.",
            )
        out[start:stop] = values
    return out


# -- bytes on the wire -----------------------------------------------------------------------

_HEADER = struct.Struct("<8sQII")  # magic, length, slots, chunk count


def encode_encrypted(update: EncryptedUpdate) -> bytes:
    """``magic || length u64 || slots u32 || count u32 || (size u32 || ciphertext)*``,
    little-endian: TenSEAL's own serialisation of each ciphertext, framed; never pickle."""
    parts = [_HEADER.pack(BLOB_MAGIC, update.length, update.slots, len(update.chunks))]
    for chunk in update.chunks:
        parts.append(struct.pack("<I", len(chunk)))
        parts.append(chunk)
    return b"".join(parts)


def decode_encrypted(data: bytes, *, max_length: int | None = None) -> EncryptedUpdate:
    """The inverse of :func:`encode_encrypted`; bytes from a peer that do not parse raise
    ``privacy.he.malformed``, and ``max_length`` bounds the update's length (the model's size)
    before anything is allocated. The ciphertexts themselves are checked when they are used."""
    view = memoryview(data)
    if len(view) < _HEADER.size:
        raise _error("malformed", "The encrypted update is truncated; it was not used.")
    magic, length, slots, count = _HEADER.unpack_from(view, 0)
    if magic != BLOB_MAGIC:
        raise _error("malformed", "These bytes are not a Tessera encrypted update.")
    if max_length is not None and length > max_length:
        raise _error(
            "shape_mismatch",
            f"The encrypted update holds {length} values; the model has {max_length}.",
        )
    if slots == 0 or length == 0 or count != -(-length // slots):
        raise _error(
            "shape_mismatch",
            f"The encrypted update's header is inconsistent ({length} values, {slots} slots, "
            f"{count} ciphertexts); it was not used.",
        )
    offset = _HEADER.size
    chunks: list[bytes] = []
    for _ in range(count):
        if offset + 4 > len(view):
            raise _error("malformed", "The encrypted update is truncated; it was not used.")
        (size,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if size == 0 or size > _MAX_CHUNK_BYTES or offset + size > len(view):
            raise _error("malformed", "The encrypted update is truncated; it was not used.")
        chunks.append(bytes(view[offset : offset + size]))
        offset += size
    if offset != len(view):
        raise _error("malformed", "The encrypted update has trailing bytes; it was not used.")
    return EncryptedUpdate(length=length, slots=slots, chunks=tuple(chunks))
