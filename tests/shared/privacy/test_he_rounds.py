"""HE rounds: sites encrypt local models, the coordinator averages them blind, sites decrypt."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from shared.errors import HomomorphicError
from shared.privacy.he_rounds import (
    aggregate_local_models,
    check_encrypted_upload,
    decrypt_global,
    encrypt_local_model,
    sample_weights,
    uniform_weights,
)
from shared.privacy.homomorphic import decode_encrypted, generate_context, public_context

TOL = 1e-4  # CKKS at scale 2**40 on values of unit size: errors are about 1e-6
SITES = ("site-c", "site-a", "site-b")  # not sorted, on purpose
TINY = {"w": ((3, 4), "float32"), "b": ((5,), "float32")}
# 4485 floats: two ciphertexts of 4096 slots at the default degree 8192
LARGE = {"conv": ((70, 64), "float32"), "bias": ((5,), "float32")}


@pytest.fixture(scope="module")
def secret() -> bytes:
    return generate_context()


@pytest.fixture(scope="module")
def public(secret: bytes) -> bytes:
    return public_context(secret)


def _arrays(layout: dict, seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (scale * rng.normal(size=shape)).astype(dtype)
        for name, (shape, dtype) in layout.items()
    }


def _round(secret: bytes, layout: dict) -> tuple[dict, dict[str, dict], dict[str, bytes]]:
    global_arrays = _arrays(layout, seed=0)
    updates = {site: _arrays(layout, seed=i + 1, scale=0.1) for i, site in enumerate(SITES)}
    uploads = {
        site: encrypt_local_model(secret, global_arrays, updates[site], layout) for site in SITES
    }
    return global_arrays, updates, uploads


def _expected(global_arrays: dict, updates: dict, weights: dict[str, float]) -> dict:
    return {
        name: sum(
            w * (global_arrays[name].astype(np.float64) + updates[s][name].astype(np.float64))
            for s, w in weights.items()
        )
        for name in global_arrays
    }


@pytest.mark.parametrize("layout", [TINY, LARGE], ids=["tiny", "two-ciphertexts"])
@pytest.mark.parametrize("weighting", ["samples", "uniform"])
def test_the_decrypted_aggregate_is_the_weighted_mean_of_the_local_models(
    secret: bytes, public: bytes, layout: dict, weighting: str
) -> None:
    global_arrays, updates, uploads = _round(secret, layout)
    if weighting == "samples":
        weights = sample_weights({"site-a": 120, "site-b": 40, "site-c": 840})
    else:
        weights = uniform_weights(SITES)
    for data in uploads.values():
        checked = check_encrypted_upload(public, data, layout)
        assert checked.length == sum(int(np.prod(s)) for s, _ in layout.values())
    if layout is LARGE:
        assert len(decode_encrypted(uploads["site-a"]).chunks) == 2
    aggregate = aggregate_local_models(public, uploads, weights)
    got = decrypt_global(secret, aggregate, layout)
    want = _expected(global_arrays, updates, weights)
    assert set(got) == set(layout)
    for name, (shape, dtype) in layout.items():
        assert got[name].shape == shape and got[name].dtype == np.dtype(dtype)
        np.testing.assert_allclose(got[name], want[name], atol=TOL, rtol=0)


def test_the_weights_are_hand_checkable() -> None:
    assert sample_weights({"b": 30, "a": 10}) == {"a": 0.25, "b": 0.75}
    assert sample_weights({"a": 0, "b": 5}) == {"a": 0.0, "b": 1.0}
    assert uniform_weights(["x", "y", "z", "w"]) == {"w": 0.25, "x": 0.25, "y": 0.25, "z": 0.25}


def test_a_zero_weight_site_is_left_out_of_the_sum(secret: bytes, public: bytes) -> None:
    global_arrays, updates, uploads = _round(secret, TINY)
    weights = {"site-a": 0.0, "site-b": 0.25, "site-c": 0.75}
    got = decrypt_global(secret, aggregate_local_models(public, uploads, weights), TINY)
    want = _expected(global_arrays, updates, weights)
    for name in TINY:
        np.testing.assert_allclose(got[name], want[name], atol=TOL, rtol=0)


def test_the_coordinator_with_the_public_context_cannot_decrypt(
    secret: bytes, public: bytes
) -> None:
    _, _, uploads = _round(secret, TINY)
    aggregate = aggregate_local_models(public, uploads, uniform_weights(SITES))
    with pytest.raises(HomomorphicError, match="no secret key") as info:
        decrypt_global(public, aggregate, TINY)
    assert info.value.code == "privacy.he.secret_key"
    with pytest.raises(HomomorphicError, match="no secret key") as info:
        decrypt_global(public, uploads["site-a"], TINY)
    assert info.value.code == "privacy.he.secret_key"
    # and it refuses to work with the secret key itself
    with pytest.raises(HomomorphicError, match="holds the secret key") as info:
        check_encrypted_upload(secret, uploads["site-a"], TINY)
    assert info.value.code == "privacy.he.secret_key"
    with pytest.raises(HomomorphicError, match="holds the secret key") as info:
        aggregate_local_models(secret, uploads, uniform_weights(SITES))
    assert info.value.code == "privacy.he.secret_key"


def test_the_same_inputs_in_another_order_give_the_same_bytes(secret: bytes, public: bytes) -> None:
    _, _, uploads = _round(secret, TINY)
    weights = sample_weights({"site-a": 3, "site-b": 5, "site-c": 2})
    forward = aggregate_local_models(public, uploads, weights)
    backward = aggregate_local_models(
        public,
        dict(reversed(list(uploads.items()))),
        dict(reversed(list(weights.items()))),
    )
    assert forward == backward


@contextmanager
def _refused(code: str, match: str) -> Iterator[None]:
    """A HomomorphicError whose message matches ``match`` and whose code is ``code``."""
    with pytest.raises(HomomorphicError, match=match) as info:
        yield
    assert info.value.code == f"privacy.he.{code}"


def test_an_upload_of_another_length_is_refused(secret: bytes, public: bytes) -> None:
    other = {"w": ((3, 4), "float32"), "b": ((6,), "float32")}
    arrays = _arrays(other, seed=5)
    longer = encrypt_local_model(secret, arrays, _arrays(other, seed=6), other)
    with _refused("shape_mismatch", "holds 18 values; the model has 17"):
        check_encrypted_upload(public, longer, TINY)
    shorter = {"w": ((3, 4), "float32"), "b": ((4,), "float32")}
    arrays = _arrays(shorter, seed=5)
    data = encrypt_local_model(secret, arrays, _arrays(shorter, seed=6), shorter)
    with _refused("shape_mismatch", "holds 16 values; this round's model has 17"):
        check_encrypted_upload(public, data, TINY)
    with _refused("shape_mismatch", "holds 16 values; the model has 17"):
        decrypt_global(secret, data, TINY)


def test_truncated_or_garbled_uploads_are_refused(secret: bytes, public: bytes) -> None:
    _, _, uploads = _round(secret, TINY)
    data = uploads["site-a"]
    with _refused("malformed", "truncated"):
        check_encrypted_upload(public, data[:-10], TINY)
    with _refused("malformed", "not a Tessera encrypted update"):
        check_encrypted_upload(public, b"XXXXXXXX" + data[8:], TINY)
    header = 8 + 8 + 4 + 4 + 4  # magic, length, slots, count, chunk size
    noise = np.random.default_rng(9).bytes(len(data) - header)
    with _refused("malformed", "not a CKKS ciphertext"):
        check_encrypted_upload(public, data[:header] + noise, TINY)


def test_an_aggregate_sent_back_as_an_upload_is_not_fresh(secret: bytes, public: bytes) -> None:
    # it has spent its level: adding it to fresh uploads would fail the whole round later
    _, _, uploads = _round(secret, TINY)
    aggregate = aggregate_local_models(public, uploads, uniform_weights(SITES))
    with _refused("malformed", "not a fresh encryption"):
        check_encrypted_upload(public, aggregate, TINY)


@pytest.mark.parametrize(
    "weights, match",
    [
        ({"site-a": 0.5, "site-b": 0.25, "site-c": 0.5}, "sum to 1.25, not 1"),
        ({"site-a": 1.25, "site-b": -0.25, "site-c": 0.0}, "'site-b'.s weight is -0.25"),
        ({"site-a": float("nan"), "site-b": 0.5, "site-c": 0.5}, "finite and >= 0"),
        ({"site-a": 0.5, "site-b": 0.5}, "one weight per upload"),
    ],
    ids=["sum", "negative", "nan", "missing"],
)
def test_bad_weights_are_refused(
    secret: bytes, public: bytes, weights: dict[str, float], match: str
) -> None:
    _, _, uploads = _round(secret, TINY)
    with _refused("bad_parameter", match):
        aggregate_local_models(public, uploads, weights)


def test_bad_sample_counts_and_site_lists_are_refused() -> None:
    with _refused("bad_parameter", "any samples"):
        sample_weights({"a": 0, "b": 0})
    with _refused("bad_parameter", "integer >= 0"):
        sample_weights({"a": -3, "b": 5})
    with _refused("bad_parameter", "distinct site ids"):
        uniform_weights([])
    with _refused("bad_parameter", "distinct site ids"):
        uniform_weights(["a", "a"])


def test_a_bad_local_model_is_refused_before_encryption(secret: bytes) -> None:
    global_arrays = _arrays(TINY, seed=0)
    update = _arrays(TINY, seed=1)
    nan = dict(update, b=np.array([0, 0, np.nan, 0, 0], np.float32))
    with _refused("bad_parameter", "NaN or infinite"):
        encrypt_local_model(secret, global_arrays, nan, TINY)
    missing = {"w": update["w"]}
    with _refused("shape_mismatch", "The update has no entry 'b'"):
        encrypt_local_model(secret, global_arrays, missing, TINY)
    wrong = dict(update, w=np.zeros((4, 3), np.float32))
    with _refused("shape_mismatch", r"has shape \(4, 3\), not \(3, 4\)"):
        encrypt_local_model(secret, global_arrays, wrong, TINY)
    extra = dict(update, step=np.zeros(1, np.float32))
    with _refused("shape_mismatch", "entries the round's model lacks"):
        encrypt_local_model(secret, global_arrays, extra, TINY)
    huge = dict(update, b=np.full(5, 1e6, np.float32))
    with _refused("bad_parameter", "magnitude 1e\\+06; these CKKS parameters hold at most 262144"):
        encrypt_local_model(secret, global_arrays, huge, TINY)


def test_a_non_float_layout_entry_is_refused(secret: bytes, public: bytes) -> None:
    layout = dict(TINY, num_batches_tracked=((), "int64"))
    arrays = dict(_arrays(TINY, seed=0), num_batches_tracked=np.array(3, np.int64))
    with _refused("bad_parameter", "'num_batches_tracked' is int64; HE mode averages float"):
        encrypt_local_model(secret, arrays, arrays, layout)
    _, _, uploads = _round(secret, TINY)
    with _refused("bad_parameter", "averages float weights only"):
        check_encrypted_upload(public, uploads["site-a"], layout)
    with _refused("bad_parameter", "averages float weights only"):
        decrypt_global(secret, uploads["site-a"], layout)
