"""Clipping and fixed-point quantisation for secure aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.errors import PrivacyParameterError, UpdateError
from shared.privacy.quantise import Quantiser, clip_l2

updates = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64]),
    shape=st.integers(1, 64),
    elements=st.floats(-1e3, 1e3, allow_nan=False, width=32),
)


@settings(max_examples=60, deadline=None)
@given(
    update=updates,
    clip_norm=st.floats(1e-3, 1e3),
    bits=st.sampled_from([16, 32, 64]),
    max_sites=st.integers(1, 100),
    stochastic=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_is_within_the_error_bound(
    update: np.ndarray,
    clip_norm: float,
    bits: int,
    max_sites: int,
    stochastic: bool,
    seed: int,
) -> None:
    q = Quantiser(clip_norm=clip_norm, max_sites=max_sites, bits=bits)
    rng = np.random.default_rng(seed) if stochastic else None
    encoded = q.quantise(update, rng)
    assert encoded.dtype == q.dtype and encoded.shape == (update.size,)
    back = q.dequantise(encoded, 1)
    clipped = clip_l2(update, clip_norm)
    # The bound holds up to float64 rounding of the scaled value itself.
    slack = q.error_bound(1, stochastic=stochastic) * (1 + 1e-9) + 1e-12 * clip_norm
    assert np.max(np.abs(back - clipped)) <= slack


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 12),
    bits=st.sampled_from([16, 32, 64]),
    sign=st.sampled_from([-1.0, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_worst_case_sum_of_max_sites_does_not_wrap(
    n: int, bits: int, sign: float, seed: int
) -> None:
    # Every site puts its whole norm on one coordinate with the same sign: the largest sum.
    q = Quantiser(clip_norm=2.5, max_sites=n, bits=bits)
    update = np.array([sign * 2.5, 0.0, 0.0])
    rng = np.random.default_rng(seed)
    total = np.zeros(3, dtype=q.dtype)
    for _ in range(n):
        total += q.quantise(update, rng)
    got = q.dequantise(total, n)
    assert got[0] == pytest.approx(sign * 2.5 * n, abs=q.error_bound(n, stochastic=True))
    assert np.all(np.abs(got[1:]) <= q.error_bound(n, stochastic=True))


def test_sums_wrap_modulo_two_to_the_bits_and_come_back_exactly() -> None:
    q = Quantiser(clip_norm=1.0, max_sites=4)
    rng = np.random.default_rng(7)
    xs = [rng.normal(size=1000) * 0.02 for _ in range(4)]
    total = np.zeros(1000, dtype=np.uint32)
    for x in xs:
        total += q.quantise(x)
    expected = sum(np.rint(x * q.scale) for x in xs) / q.scale
    np.testing.assert_array_equal(q.dequantise(total, 4), expected)


def test_clip_scales_long_updates_to_the_bound_and_keeps_short_ones() -> None:
    long = np.array([3.0, 4.0], dtype=np.float32)
    np.testing.assert_allclose(clip_l2(long, 1.0), [0.6, 0.8])
    short = np.array([0.3, 0.4])
    np.testing.assert_array_equal(clip_l2(short, 1.0), short)
    assert clip_l2(np.ones((10, 10)), 2.0).shape == (100,)


def test_stochastic_rounding_is_unbiased() -> None:
    q = Quantiser(clip_norm=1e6, max_sites=1)  # a bound so large that nothing is clipped
    x = np.full(20_000, 0.25 / q.scale)
    encoded = q.quantise(x, np.random.default_rng(3)).view(np.int32)
    assert set(np.unique(encoded)) == {0, 1}
    assert encoded.mean() == pytest.approx(0.25, abs=0.015)
    assert np.all(q.quantise(x).view(np.int32) == 0)  # nearest rounding: always down


@pytest.mark.parametrize(
    ("update", "error", "match"),
    [
        (np.array([1.0, np.nan]), UpdateError, "contains NaN or infinite values"),
        (np.array([np.inf]), UpdateError, "contains NaN or infinite values"),
        (np.array([1, 2]), UpdateError, "must hold floating-point numbers"),
    ],
)
def test_invalid_updates(update: np.ndarray, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Quantiser(clip_norm=1.0, max_sites=2).quantise(update)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_norm": 0.0}, "clipping bound must be a finite number > 0"),
        ({"clip_norm": math.inf}, "clipping bound must be a finite number > 0"),
        ({"bits": 8}, "works modulo 2\\*\\*16, 2\\*\\*32 or 2\\*\\*64"),
        ({"max_sites": 0}, "max_sites must be a whole number >= 1"),
        ({"bits": 16, "max_sites": 20_000}, "16 bits leave no room to sum 20000 updates"),
    ],
)
def test_invalid_quantiser(kwargs: dict, match: str) -> None:
    with pytest.raises(PrivacyParameterError, match=match):
        Quantiser(**{"clip_norm": 1.0, "max_sites": 2, **kwargs})


def test_dequantise_checks_count_and_dtype() -> None:
    q = Quantiser(clip_norm=1.0, max_sites=3)
    with pytest.raises(PrivacyParameterError, match="sums 1 to 3 updates exactly, not 4"):
        q.dequantise(np.zeros(2, dtype=np.uint32), 4)
    with pytest.raises(UpdateError, match="32-bit secure sum must be uint32, not uint16"):
        q.dequantise(np.zeros(2, dtype=np.uint16), 2)
