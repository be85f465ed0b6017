"""Homomorphic-encryption aggregation (CKKS) against the plain round, 3 sites x 1M parameters.

Run: ``python -m benchmarks.homomorphic``. In-process, with the pure functions of
``shared.privacy.homomorphic`` (TenSEAL CKKS at the default parameters: degree 8192, 4096
slots a ciphertext, primes 60-40-60, scale 2**40). Each site's update is 1M float32 values from
a seeded generator; making it is not timed. The updates are weighted by sample counts over
their total (FedAvg), as plain scalars in the HE round.

- Plain round: each site serialises its update (safetensors) and hashes it; the coordinator
  loads each payload, checks the hash and adds it, weighted, into one float32 sum.
- HE round: each site encrypts its update (245 ciphertexts) and frames it as bytes; the
  coordinator parses the three payloads and adds the ciphertexts, weighted, with the public
  context (no secret key); one site decrypts the aggregate. The result is checked against the
  float64 weighted sum.
- Key setup (once per run, not per round, so not in the ratio): the key site makes the CKKS
  key and seals it to the two other sites (X25519 + AES-GCM); they open it.

Figures on the RESULT line:

- ``overhead_ratio``: HE round over plain round, each as one site's mean work plus the
  coordinator's work (plus the decryption for HE: sites work in parallel in a real round, the
  coordinator serially).
- ``bytes_ratio``: one site's encrypted upload over its plain payload. Reported, no bar: the
  two ratios say when a plan should prefer secure aggregation by masking (``secagg``, about
  1.0 on the wire) to HE.
"""

from __future__ import annotations

import hashlib
import statistics
import time

import numpy as np
import safetensors.numpy as stn
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shared.privacy.homomorphic import (
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

PARAMS = 1_000_000
SITES = 3
SAMPLES = (300, 500, 1200)  # each site's image count: the FedAvg weights
TOLERANCE = 1e-4  # CKKS precision at scale 2**40 on updates of size 1e-2


def site_update(index: int) -> np.ndarray:
    rng = np.random.default_rng(2000 + index)
    return rng.standard_normal(PARAMS, dtype=np.float32) * np.float32(1e-2)


def weights() -> list[float]:
    total = sum(SAMPLES)
    return [n / total for n in SAMPLES]


def plain_round() -> tuple[float, float, int, np.ndarray]:
    """(mean site seconds, coordinator seconds, payload bytes, float64 weighted sum)."""
    site_s, coord_s = [], 0.0
    total = np.zeros(PARAMS, dtype=np.float32)
    reference = np.zeros(PARAMS, dtype=np.float64)
    payload_bytes = 0
    for i, w in enumerate(weights()):
        update = site_update(i)
        t0 = time.perf_counter()
        payload = stn.save({"update": update})
        digest = hashlib.sha256(payload).hexdigest()
        t1 = time.perf_counter()
        loaded = stn.load(payload)["update"]
        if hashlib.sha256(payload).hexdigest() != digest:
            raise SystemExit("FAILED: plain payload hash")
        total += np.float32(w) * loaded
        t2 = time.perf_counter()
        site_s.append(t1 - t0)
        coord_s += t2 - t1
        payload_bytes = len(payload)
        reference += w * update.astype(np.float64)
    return statistics.fmean(site_s), coord_s, payload_bytes, reference


def key_setup() -> tuple[float, bytes, bytes]:
    """(seconds, the secret context as the other sites hold it, the coordinator's context)."""
    keys = [X25519PrivateKey.generate() for _ in range(SITES)]
    t0 = time.perf_counter()
    secret = generate_context()
    sealed = [
        seal_secret_context(secret, sender=keys[0], recipient=k.public_key(), run_id="bench")
        for k in keys[1:]
    ]
    public = public_context(secret)
    opened = [
        open_secret_context(b, recipient=k, sender=keys[0].public_key(), run_id="bench")
        for b, k in zip(sealed, keys[1:], strict=True)
    ]
    seconds = time.perf_counter() - t0
    if any(o != secret for o in opened):
        raise SystemExit("FAILED: a site opened another key")
    return seconds, opened[-1], public


def he_round(secret: bytes, public: bytes) -> tuple[float, float, float, int, np.ndarray]:
    """(mean site seconds, coordinator seconds, decrypt seconds, upload bytes, result)."""
    site_s, payloads = [], []
    for i in range(SITES):
        update = site_update(i)
        t0 = time.perf_counter()
        payloads.append(encode_encrypted(encrypt_update(secret, update)))
        site_s.append(time.perf_counter() - t0)
        del update
    t0 = time.perf_counter()
    received = [decode_encrypted(p, max_length=PARAMS) for p in payloads]
    aggregate = encode_encrypted(aggregate_encrypted(public, received, weights()))
    coord_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = decrypt_update(secret, decode_encrypted(aggregate, max_length=PARAMS))
    decrypt_s = time.perf_counter() - t0
    return statistics.fmean(site_s), coord_s, decrypt_s, len(payloads[0]), result


def main() -> None:
    print(f"{SITES} sites x {PARAMS:,} float32 parameters, weighted by samples {SAMPLES}")
    plain_site, plain_coord, plain_bytes, reference = plain_round()
    print(
        f"plain round: site {plain_site:.3f} s (serialise + hash), coordinator "
        f"{plain_coord:.3f} s for {SITES} updates, payload {plain_bytes:,} bytes"
    )
    setup_s, secret, public = key_setup()
    print(f"key setup (once per run): {setup_s:.3f} s, public context {len(public)} bytes")
    site_s, coord_s, decrypt_s, he_bytes, result = he_round(secret, public)
    print(
        f"HE round: site {site_s:.3f} s (encrypt + frame), coordinator {coord_s:.3f} s "
        f"(parse + weighted sum of ciphertexts), one site decrypts in {decrypt_s:.3f} s, "
        f"payload {he_bytes:,} bytes"
    )
    err = float(np.max(np.abs(result - reference)))
    print(f"check: max |HE sum - plain weighted sum| = {err:.3g} (tolerance {TOLERANCE:g})")
    if not err <= TOLERANCE:
        raise SystemExit("FAILED: HE sum outside CKKS precision")
    overhead = (site_s + coord_s + decrypt_s) / (plain_site + plain_coord)
    bytes_ratio = he_bytes / plain_bytes
    print(
        f"RESULT overhead_ratio={overhead:.2f} bytes_ratio={bytes_ratio:.2f} "
        f"sites={SITES} params={PARAMS}"
    )


if __name__ == "__main__":
    main()
