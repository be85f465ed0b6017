"""Secure aggregation against the plain round, at 10 sites x 10M parameters, in one run.

Run: ``python -m benchmarks.secure_aggregation``. Everything is in-process and uses the pure
functions of ``shared.privacy`` (the real X25519, Ed25519, AES-GCM, Shamir and AES-CTR code);
sites are handled one after another so that at most a handful of model-sized vectors exist at
once (about 0.4 GB peak). Each site's update is 10M float32 values made from a seeded
generator; making it is not timed.

- Plain round: each site serialises its update (safetensors) and hashes it; the coordinator
  loads each payload, checks the hash and adds it into one float32 sum.
- Secure round (Bonawitz et al., CCS 2017): each site advertises keys, deals Shamir shares,
  then clips, quantises (32 bits, stochastic rounding), masks and serialises; the coordinator
  checks and sums the masked updates and unmasks. ``DROPPED`` sites drop after sharing, so the
  coordinator rebuilds their mask keys from the survivors' shares and removes their pairwise
  masks (the recovery path). The result is checked against the float64 sum of the survivors'
  plain updates and the quantiser's documented error bound.

Figures on the RESULT line:

- ``per_site_mask_seconds``: a surviving site's secure-aggregation work (keys, shares, clip,
  quantise, mask and digest; serialisation is not counted, the plain round does it too), mean
  over the survivors.
- ``upload_seconds_100mbit``: the time that site's upload (the masked payload) takes on a 100
  Mbit/s hospital link. Bar: ``per_site_mask_seconds <= 0.25 x upload_seconds_100mbit``.
- ``mask_gbs``: mask bytes expanded and applied per second by ``prg.apply_masks`` for one site
  (its self-mask plus one pairwise mask per other site, into one 10M-value vector), best of 3.
- ``aes_ctr_gbs``: ``cryptography``'s raw AES-256-CTR keystream over the same number of bytes,
  best of 3 and of two ways (one call over a zero buffer; 256 KiB ``update_into`` calls).
  Bar: ``mask_gbs >= 0.5 x aes_ctr_gbs``.
- ``unmask_seconds``: the coordinator's unmasking (answers checked, self-mask seeds and the
  dropped sites' mask keys rebuilt and checked, masks removed, dequantised).
- ``overhead_ratio``: secure round over plain round, each as one site's mean work plus the
  coordinator's work (sites work in parallel in a real round; the coordinator serially).
- ``bytes_ratio``: what one surviving site sends in the secure round (every message's fields
  as JSON, plus the payload) over the plain payload. Bar: ``<= 1.1``.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time

import numpy as np
import safetensors.numpy as stn
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from shared.crypto.keys import generate_signing_key
from shared.privacy.prg import CHUNK_BYTES, apply_masks
from shared.privacy.quantise import Quantiser
from shared.privacy.secagg import SecAggConfig, SecAggServer, SecAggSite

PARAMS = 10_000_000
SITES = 10
THRESHOLD = 6
DROPPED = 2
CLIP_NORM = 10.0
LINK_BITS_PER_S = 100e6
RUNS = 3


def site_update(index: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + index)
    return rng.standard_normal(PARAMS, dtype=np.float32) * np.float32(1e-3)


def json_bytes(message: object) -> int:
    return len(json.dumps(message.fields(), separators=(",", ":")))  # type: ignore[attr-defined]


def plain_round(names: list[str], survivors: set[str]) -> tuple[float, float, int, np.ndarray]:
    """(mean site seconds, coordinator seconds, payload bytes, survivors' float64 sum)."""
    site_s, coord_s = [], 0.0
    total = np.zeros(PARAMS, dtype=np.float32)
    reference = np.zeros(PARAMS, dtype=np.float64)
    payload_bytes = 0
    for i, name in enumerate(names):
        update = site_update(i)
        t0 = time.perf_counter()
        payload = stn.save({"update": update})
        digest = hashlib.sha256(payload).hexdigest()
        t1 = time.perf_counter()
        loaded = stn.load(payload)["update"]
        if hashlib.sha256(payload).hexdigest() != digest:
            raise SystemExit("FAILED: plain payload hash")
        np.add(total, loaded, out=total)
        t2 = time.perf_counter()
        site_s.append(t1 - t0)
        coord_s += t2 - t1
        payload_bytes = len(payload)
        if name in survivors:
            reference += update
        del update, payload, loaded
    return statistics.fmean(site_s), coord_s, payload_bytes, reference


def secure_round(
    names: list[str], dropped: set[str]
) -> tuple[list[float], float, float, int, int, np.ndarray, Quantiser]:
    """(survivor site seconds, coordinator receive seconds, unmask seconds, payload bytes,
    message bytes per survivor, result, quantiser)."""
    keys = {s: generate_signing_key() for s in names}
    public = {s: k.public_key() for s, k in keys.items()}
    coordinator = generate_signing_key()
    quantiser = Quantiser(clip_norm=CLIP_NORM, max_sites=SITES, bits=32)
    config = SecAggConfig(
        run_id="bench",
        round=1,
        sites=tuple(names),
        threshold=THRESHOLD,
        vector_length=PARAMS,
        quantiser=quantiser,
    )
    server = SecAggServer(config, signing_key=coordinator, site_keys=public)
    sites = {
        s: SecAggSite(
            config,
            site=s,
            signing_key=keys[s],
            site_keys=public,
            coordinator_key=coordinator.public_key(),
        )
        for s in names
    }
    site_s = dict.fromkeys(names, 0.0)
    sent = dict.fromkeys(names, 0)
    coord_s = 0.0

    for s in names:
        t0 = time.perf_counter()
        ad = sites[s].advertise()
        t1 = time.perf_counter()
        server.receive_advertisement(ad)
        coord_s += time.perf_counter() - t1
        site_s[s] += t1 - t0
        sent[s] += json_bytes(ad)
    t0 = time.perf_counter()
    ads = server.advertisements()
    coord_s += time.perf_counter() - t0
    for s in names:
        t0 = time.perf_counter()
        shares = sites[s].share(ads)
        t1 = time.perf_counter()
        server.receive_shares(shares)
        coord_s += time.perf_counter() - t1
        site_s[s] += t1 - t0
        sent[s] += sum(json_bytes(m) for m in shares)

    rng = np.random.default_rng(7)
    payload_bytes = 0
    for i, s in enumerate(names):
        if s in dropped:
            continue  # dropped after sharing: never sends its masked update
        update = site_update(i)
        t0 = time.perf_counter()
        dealt = server.shares_for(s)
        t1 = time.perf_counter()
        message, masked = sites[s].mask(update, dealt, rng=rng)
        t2 = time.perf_counter()
        payload = stn.save({"masked": masked})
        t3 = time.perf_counter()
        received = stn.load(payload)["masked"]
        server.receive_masked_input(message, received)
        t4 = time.perf_counter()
        site_s[s] += t2 - t1
        coord_s += (t1 - t0) + (t4 - t3)
        payload_bytes = len(payload)
        sent[s] += json_bytes(message) + len(payload)
        del update, masked, payload, received

    t0 = time.perf_counter()
    request = server.unmask_request()
    unmask_s = time.perf_counter() - t0
    answers = {}
    for s in request.survivors:
        t0 = time.perf_counter()
        answers[s] = sites[s].unmask(request)
        site_s[s] += time.perf_counter() - t0
        sent[s] += json_bytes(answers[s])
    t0 = time.perf_counter()
    for s in request.survivors:
        server.receive_unmask_response(answers[s])
    result = server.aggregate()
    unmask_s += time.perf_counter() - t0
    survivors = request.survivors
    per_site = [site_s[s] for s in survivors]
    message_bytes = int(statistics.fmean(sent[s] for s in survivors))
    return per_site, coord_s, unmask_s, payload_bytes, message_bytes, result, quantiser


def mask_rate() -> float:
    """GB/s of mask expanded and applied for one site: its self-mask + SITES - 1 pairs."""
    target = np.ones(PARAMS, dtype=np.uint32)
    seeds = [bytes([i]) * 32 for i in range(SITES)]
    best = 0.0
    for _ in range(RUNS):
        t0 = time.perf_counter()
        apply_masks(target, add=seeds[: SITES // 2], subtract=seeds[SITES // 2 :])
        best = max(best, SITES * PARAMS * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def aes_ctr_rate() -> float:
    """GB/s of raw AES-256-CTR keystream from ``cryptography`` over the same bytes."""
    nbytes = SITES * PARAMS * 4
    best = 0.0
    zeros = bytes(PARAMS * 4)
    for _ in range(RUNS):
        t0 = time.perf_counter()
        for i in range(SITES):
            ctx = Cipher(algorithms.AES(bytes([i]) * 32), modes.CTR(bytes(16))).encryptor()
            ctx.update(zeros)
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    chunk = bytes(CHUNK_BYTES)
    out = bytearray(CHUNK_BYTES + 16)
    for _ in range(RUNS):
        t0 = time.perf_counter()
        for i in range(SITES):
            ctx = Cipher(algorithms.AES(bytes([i]) * 32), modes.CTR(bytes(16))).encryptor()
            for _ in range(PARAMS * 4 // CHUNK_BYTES):
                ctx.update_into(chunk, out)
        done = SITES * (PARAMS * 4 // CHUNK_BYTES) * CHUNK_BYTES
        best = max(best, done / (time.perf_counter() - t0) / 1e9)
    return best


def main() -> None:
    names = [f"site-{i:02d}" for i in range(SITES)]
    dropped = set(names[3 : 3 + DROPPED])  # in the middle: pairs on both sides need undoing
    survivors = set(names) - dropped
    print(f"{SITES} sites x {PARAMS:,} float32 parameters; {DROPPED} drop after sharing")

    plain_site, plain_coord, plain_bytes, reference = plain_round(names, survivors)
    print(
        f"plain round: site {plain_site:.3f} s (serialise + hash), coordinator "
        f"{plain_coord:.3f} s for {SITES} updates, payload {plain_bytes:,} bytes"
    )

    per_site, coord_s, unmask_s, secure_bytes, sent, result, quantiser = secure_round(
        names, dropped
    )
    site_mean = statistics.fmean(per_site)
    print(
        f"secure round: site {site_mean:.3f} s (min {min(per_site):.3f}, max "
        f"{max(per_site):.3f}), coordinator {coord_s:.3f} s receiving + {unmask_s:.3f} s "
        f"unmasking, payload {secure_bytes:,} bytes, {sent:,} bytes sent per site"
    )

    err = float(np.max(np.abs(result - reference)))
    bound = quantiser.error_bound(len(survivors), stochastic=True)
    print(f"check: max |secure sum - plain sum of survivors| = {err:.3g} (bound {bound:.3g})")
    if not err <= bound:
        raise SystemExit("FAILED: secure sum outside the quantisation error bound")
    del result, reference

    mask_gbs = mask_rate()
    aes_gbs = aes_ctr_rate()
    upload_s = secure_bytes * 8 / LINK_BITS_PER_S
    overhead = (site_mean + coord_s + unmask_s) / (plain_site + plain_coord)
    bytes_ratio = sent / plain_bytes
    ok = mask_gbs >= 0.5 * aes_gbs and site_mean <= 0.25 * upload_s and bytes_ratio <= 1.1
    print(
        "bars: mask_gbs >= 0.5 x aes_ctr_gbs, per_site_mask_seconds <= 0.25 x "
        f"upload_seconds_100mbit, bytes_ratio <= 1.1: {'ok' if ok else 'MISSED'}"
    )
    print(
        f"RESULT per_site_mask_seconds={site_mean:.3f} upload_seconds_100mbit={upload_s:.3f} "
        f"mask_gbs={mask_gbs:.3f} aes_ctr_gbs={aes_gbs:.3f} unmask_seconds={unmask_s:.3f} "
        f"overhead_ratio={overhead:.3f} bytes_ratio={bytes_ratio:.4f}"
    )


if __name__ == "__main__":
    main()
