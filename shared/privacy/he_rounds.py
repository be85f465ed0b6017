"""One round of homomorphic-encryption (CKKS) federated averaging, for both ends, sans I/O.

Theory of operation
-------------------
The building blocks are in :mod:`shared.privacy.homomorphic`; this module fixes how a round
uses them. The default CKKS parameters have one rescaling level: the coordinator may multiply
a fresh ciphertext by one plain scalar, and no more. Were sites to upload updates, the
coordinator would add ``sum_i w_i Enc(u_i)`` onto last round's ``Enc(global)``, a ciphertext
that has spent its level and is never refreshed, so its noise would build up round after
round. Instead each site uploads its *local model*, ``global + update``, freshly encrypted,
and every round is one weighted sum of fresh ciphertexts (FedAvg, McMahan et al., AISTATS
2017) that spends the level once and needs nothing from the round before::

    site i        encrypt_local_model(secret, global, update_i, layout) -> bytes
    coordinator   check_encrypted_upload(public, bytes, layout)          before it acknowledges
                  aggregate_local_models(public, uploads, weights)       Enc(sum_i w_i local_i)
    every site    decrypt_global(secret, aggregate, layout)              next round's global

with weights ``w_i`` that sum to 1 (:func:`sample_weights` or :func:`uniform_weights`), which
keeps the result an average, so no larger than the largest local value (CKKS wraps values
beyond ``2**19`` at the default parameters; :func:`encrypt_local_model` refuses ``2**18`` on).
Round 1's model is the plan's plaintext initial model (seeded, no data in it); from then on
the coordinator holds and sends only ``Enc(global)``.

**What the coordinator sees.** Only the public context (parameters, no key): it can check that
an upload is a fresh ciphertext of the right length under these parameters and add uploads,
but it can neither decrypt nor encrypt. It learns who uploaded, the model's size and the
weights (sample counts), but no parameter of any model after round 1. It cannot tell whether a
site encrypted under the federation's key, and CKKS gives no integrity: it could send the
sites another linear combination of what it holds. Hence the canonical order: uploads are
added by sorted site id, so the same uploads and weights always give the same bytes, and
anyone holding the logged uploads and weights can recompute the aggregate and compare.

Everything crosses the wire as TenSEAL's protocol-buffer serialisation framed by
:func:`~shared.privacy.homomorphic.encode_encrypted`, never pickle. Errors are
:class:`~shared.errors.HomomorphicError` with ``privacy.he.*`` codes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from shared.errors import HomomorphicError
from shared.privacy.homomorphic import (
    BLOB_MAGIC,
    EncryptedUpdate,
    aggregate_encrypted,
    decode_encrypted,
    decrypt_update,
    encode_encrypted,
    encrypt_update,
    load_context,
    load_vector,
    max_ciphertext_bytes,
)
from shared.privacy.secagg_plan import Layout, flatten, unflatten, vector_length

__all__ = [
    "aggregate_local_models",
    "check_encrypted_upload",
    "decrypt_global",
    "encrypt_local_model",
    "is_encrypted",
    "max_upload_bytes",
    "sample_weights",
    "uniform_weights",
]

_WEIGHT_SUM_TOLERANCE = 1e-9
_HEADER_BYTES = 24  # encode_encrypted's framing before the ciphertexts


def _error(code: str, message: str) -> HomomorphicError:
    return HomomorphicError(message, code=f"privacy.he.{code}")


def _model_length(layout: Layout) -> int:
    """The flat length of ``layout``, after refusing what HE mode cannot average."""
    if not layout:
        raise _error("bad_parameter", "The model layout is empty; there is nothing to encrypt.")
    for name in sorted(layout):
        dtype_name = layout[name][1]
        try:
            dtype = np.dtype(dtype_name)
        except TypeError:
            dtype = np.dtype(object)
        if dtype.kind != "f":
            raise _error(
                "bad_parameter",
                f"Model entry {name!r} is {dtype_name}; HE mode averages float weights only. "
                "Leave non-float entries (e.g. counters) out of the encrypted model.",
            )
    length = vector_length(layout)
    if length == 0:
        raise _error("bad_parameter", "The model layout holds no values; nothing to encrypt.")
    return length


def _slots(context: Any) -> int:
    return int(context.seal_context().data.first_context_data().parms().poly_modulus_degree()) // 2


def _max_abs(context: Any) -> float:
    """The largest magnitude a weighted average can hold without CKKS wrapping it: after the
    one rescale the modulus left has ``last_bits``, of which ``scale_bits`` are the scale and
    one the sign; one more bit of margin."""
    last_bits = context.seal_context().data.last_context_data().total_coeff_modulus_bit_count()
    return float(2.0 ** (last_bits - math.log2(context.global_scale) - 2))


def _entry(arrays: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], what: str) -> Any:
    if name not in arrays:
        raise _error("shape_mismatch", f"The {what} has no entry {name!r}; the round's model has.")
    try:
        array = np.asarray(arrays[name], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise _error("bad_parameter", f"The {what}'s entry {name!r} is not numeric.") from exc
    if tuple(array.shape) != shape:
        raise _error(
            "shape_mismatch",
            f"The {what}'s entry {name!r} has shape {tuple(array.shape)}, not {shape}.",
        )
    return array


def encrypt_local_model(
    secret_context: bytes,
    global_arrays: Mapping[str, np.ndarray],
    update: Mapping[str, np.ndarray],
    layout: Layout,
) -> bytes:
    """The site's upload: ``global + update`` over ``layout``'s entries, flattened in sorted
    order, encrypted fresh under the federation's key and framed. A local model, not an
    update, because the coordinator has one multiplication to spend (see the module's note).
    ``global_arrays`` may hold more entries than ``layout``; ``update`` may not."""
    load_context(secret_context, secret=True)  # a public context is refused before any work
    _model_length(layout)
    extra = set(update) - set(layout)
    if extra:
        raise _error(
            "shape_mismatch",
            f"The update has entries the round's model lacks: {sorted(extra)!r}.",
        )
    local: dict[str, np.ndarray] = {}
    for name in sorted(layout):
        shape = tuple(int(d) for d in layout[name][0])
        local[name] = _entry(global_arrays, name, shape, "global model") + _entry(
            update, name, shape, "update"
        )
    return _encrypt_arrays(secret_context, local, layout)


def _encrypt_arrays(
    secret_context: bytes, local: Mapping[str, np.ndarray], layout: Layout
) -> bytes:
    """``local`` (checked against ``layout``) flattened, refused if not finite or beyond
    what the parameters hold, encrypted fresh and framed."""
    context = load_context(secret_context, secret=True)
    flat = flatten(local, layout)
    if not np.all(np.isfinite(flat)):
        raise _error(
            "bad_parameter",
            "The local model holds NaN or infinite values; training diverged. It was not sent.",
        )
    bound = _max_abs(context)
    if flat.size and float(np.max(np.abs(flat))) >= bound:
        raise _error(
            "bad_parameter",
            f"The local model holds values of magnitude {float(np.max(np.abs(flat))):.3g}; "
            f"these CKKS parameters hold at most {bound:.0f}. It was not sent.",
        )
    return encode_encrypted(encrypt_update(secret_context, flat))


def is_encrypted(data: bytes | memoryview) -> bool:
    """Whether ``data`` is an encrypted model (framed by ``encode_encrypted``) rather than
    safetensors: an HE run's first model is plaintext, the later ones are not."""
    return bytes(memoryview(data)[: len(BLOB_MAGIC)]) == BLOB_MAGIC


def check_encrypted_upload(public_context: bytes, data: bytes, layout: Layout) -> EncryptedUpdate:
    """What the coordinator checks before it acknowledges an upload, with the public context
    alone: the framing, the exact length of ``layout``, the packing these parameters give, and
    that every ciphertext parses and is fresh (top level, the context's scale, two parts, not
    transparent), so that it can be added to the others later. Whether it was encrypted under
    the federation's key cannot be checked without the key."""
    context = load_context(public_context, secret=False)
    length = _model_length(layout)
    upload = decode_encrypted(data, max_length=length)
    if upload.length != length:
        raise _error(
            "shape_mismatch",
            f"The encrypted model holds {upload.length} values; this round's model has {length}.",
        )
    slots = _slots(context)
    if upload.slots != slots:
        raise _error(
            "shape_mismatch",
            f"The encrypted model is packed {upload.slots} values a ciphertext; these CKKS "
            f"parameters pack {slots}.",
        )
    fresh = context.seal_context().data.first_parms_id()
    for k, chunk in enumerate(upload.chunks):
        vector = load_vector(context, chunk, "The encrypted model")
        if vector.size() != min(slots, length - k * slots):
            raise _error(
                "shape_mismatch",
                f"Ciphertext {k} of the encrypted model holds {vector.size()} values, not what "
                "its length says; it was not used.",
            )
        parts = vector.ciphertext()
        if not (
            len(parts) == 1
            and parts[0].size() == 2
            and parts[0].parms_id() == fresh
            and parts[0].scale == context.global_scale
            and not parts[0].is_transparent()
        ):
            raise _error(
                "malformed",
                f"Ciphertext {k} of the encrypted model is not a fresh encryption under these "
                "parameters (another level or scale, or not encrypted); it was not used.",
            )
    return upload


def max_upload_bytes(public_context: bytes, layout: Layout) -> int:
    """The most bytes an encrypted model of ``layout`` can take under these parameters:
    what the coordinator lets a site offer (plain updates are bounded by the model's size,
    and a ciphertext is about twelve times the floats it holds)."""
    context = load_context(public_context, secret=False)
    count = -(-_model_length(layout) // _slots(context))
    return _HEADER_BYTES + count * (4 + max_ciphertext_bytes(context))


def sample_weights(num_samples: Mapping[str, int]) -> dict[str, float]:
    """FedAvg's weights, ``n_i / sum n``: sites count as much as the examples they trained on."""
    counts: dict[str, int] = {}
    for site in sorted(num_samples):
        n = num_samples[site]
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise _error(
                "bad_parameter",
                f"Site {site!r} reports {n!r} samples; a sample count is an integer >= 0.",
            )
        counts[site] = int(n)
    total = sum(counts.values())
    if total == 0:
        raise _error("bad_parameter", "No site reports any samples; there is nothing to weight by.")
    return {site: n / total for site, n in counts.items()}


def uniform_weights(site_ids: Iterable[str]) -> dict[str, float]:
    """Equal weights, ``1 / k``, for plans that do not weight by sample count."""
    ids = list(site_ids)
    if not ids or len(set(ids)) != len(ids):
        raise _error(
            "bad_parameter",
            f"Uniform weights need distinct site ids, at least one; got {sorted(ids)!r}.",
        )
    return {site: 1.0 / len(ids) for site in sorted(ids)}


def _weights(uploads: Mapping[str, bytes], weights: Mapping[str, float]) -> dict[str, float]:
    if not uploads:
        raise _error("bad_parameter", "There are no encrypted models to average.")
    if set(weights) != set(uploads):
        raise _error(
            "bad_parameter",
            f"Give one weight per upload: weights for {sorted(weights)!r}, uploads from "
            f"{sorted(uploads)!r}.",
        )
    out: dict[str, float] = {}
    for site in sorted(weights):
        try:
            w = float(weights[site])
        except (TypeError, ValueError):
            w = math.nan
        if not (math.isfinite(w) and w >= 0.0):
            raise _error(
                "bad_parameter",
                f"Site {site!r}'s weight is {weights[site]!r}; weights are finite and >= 0.",
            )
        out[site] = w
    total = math.fsum(out.values())
    if abs(total - 1.0) > _WEIGHT_SUM_TOLERANCE:
        raise _error(
            "bad_parameter",
            f"The weights sum to {total!r}, not 1; the aggregate must be an average "
            "(one level, and CKKS's range, allow nothing else).",
        )
    return out


def aggregate_local_models(
    public_context: bytes, uploads: Mapping[str, bytes], weights: Mapping[str, float]
) -> bytes:
    """``Enc(sum_i w_i local_i)``, the next round's encrypted global model, framed. Uploads are
    added in sorted site order, so the same inputs give the same bytes. A weight too small to
    encode at the context's scale (0 included) is left out: its term would be zero anyway, and
    multiplying by a zero plaintext needs the public key, which the coordinator lacks."""
    context = load_context(public_context, secret=False)
    checked = _weights(uploads, weights)
    used = [site for site in sorted(checked) if checked[site] * context.global_scale >= 1.0]
    encrypted = [decode_encrypted(uploads[site]) for site in used]
    total = aggregate_encrypted(public_context, encrypted, weights=[checked[s] for s in used])
    return encode_encrypted(total)


def decrypt_global(secret_context: bytes, data: bytes, layout: Layout) -> dict[str, np.ndarray]:
    """The global model a site trains from next: the aggregate decrypted with the shared
    secret context and cut back into ``layout``'s entries, each in its layout dtype."""
    length = _model_length(layout)
    aggregate = decode_encrypted(data, max_length=length)
    if aggregate.length != length:
        raise _error(
            "shape_mismatch",
            f"The encrypted global model holds {aggregate.length} values; the model has {length}.",
        )
    arrays = unflatten(decrypt_update(secret_context, aggregate), layout)
    return {name: arrays[name].astype(np.dtype(layout[name][1])) for name in sorted(layout)}
