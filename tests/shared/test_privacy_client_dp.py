"""Client-level DP at a site: clipping, the noise's statistics, and the run's epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.errors import PrivacyParameterError
from shared.privacy.accountant import PrivacyBudget, get_epsilon
from shared.privacy.client_dp import (
    ClientDP,
    clip_and_noise,
    round_mechanism,
    run_epsilon,
    secure_rng,
)


def _update(scale: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": (rng.normal(size=(40, 50)) * scale).astype(np.float32),
        "bn.running_var": (rng.normal(size=(100,)) * scale).astype(np.float32),
    }


def _norm(arrays: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays.values()))


def test_a_large_update_is_clipped_to_the_bound_as_one_vector() -> None:
    update = _update(1.0)
    before = {k: v.copy() for k, v in update.items()}
    norm = _norm(update)
    dp = ClientDP(clip_norm=3.0, noise_multiplier=1e-9, delta=1e-5)
    report = clip_and_noise(update, dp, np.random.default_rng(1))
    assert report.norm == pytest.approx(norm) and report.clipped
    assert report.clipped_norm == pytest.approx(3.0)
    assert _norm(update) == pytest.approx(3.0, rel=1e-5)
    for name in update:  # every entry scaled by the same factor: the direction is kept
        np.testing.assert_allclose(update[name], before[name] * (3.0 / norm), rtol=1e-5, atol=1e-7)
        assert update[name].dtype == np.float32


def test_a_small_update_is_not_scaled_up() -> None:
    update = _update(0.001)
    before = {k: v.copy() for k, v in update.items()}
    report = clip_and_noise(
        update, ClientDP(clip_norm=3.0, noise_multiplier=1e-9, delta=1e-5), np.random.default_rng(1)
    )
    assert not report.clipped and report.clipped_norm == report.norm
    for name in update:
        np.testing.assert_allclose(update[name], before[name], rtol=1e-5, atol=1e-8)


def test_the_noise_is_gaussian_with_the_full_std_and_fixed_by_the_seed() -> None:
    """Plain aggregation: each site adds the full z*C, not a share (the coordinator sees it)."""
    dp = ClientDP(clip_norm=0.5, noise_multiplier=1.3, delta=1e-5)
    zeros = {"w": np.zeros(200_000, dtype=np.float32), "b": np.zeros(7, dtype=np.float32)}
    report = clip_and_noise(zeros, dp, np.random.default_rng(42))
    assert report.norm == 0.0 and report.noise_std == pytest.approx(0.65)
    noise = zeros["w"].astype(np.float64)
    assert abs(noise.mean()) < 5 * 0.65 / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(0.65, rel=0.01)
    kurtosis = np.mean((noise / noise.std()) ** 4)
    assert kurtosis == pytest.approx(3.0, abs=0.1)  # Gaussian, not uniform (1.8) or Laplace (6)
    again = {"w": np.zeros(200_000, dtype=np.float32), "b": np.zeros(7, dtype=np.float32)}
    clip_and_noise(again, dp, np.random.default_rng(42))
    np.testing.assert_array_equal(again["w"], zeros["w"])
    other = {"w": np.zeros(200_000, dtype=np.float32), "b": np.zeros(7, dtype=np.float32)}
    clip_and_noise(other, dp, secure_rng())
    assert not np.array_equal(other["w"], zeros["w"])


def test_bad_updates_and_settings_are_refused() -> None:
    dp = ClientDP(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    with pytest.raises(PrivacyParameterError, match="NaN or infinite values"):
        clip_and_noise({"w": np.array([np.nan], dtype=np.float32)}, dp, np.random.default_rng(0))
    with pytest.raises(PrivacyParameterError, match="'steps' is int64; only floating-point"):
        clip_and_noise({"steps": np.array([3])}, dp, np.random.default_rng(0))
    with pytest.raises(PrivacyParameterError, match=r"dp\.clip_norm must be a finite number > 0"):
        ClientDP(clip_norm=math.inf, noise_multiplier=1.0, delta=1e-5)
    with pytest.raises(PrivacyParameterError, match=r"dp\.delta must be a number strictly between"):
        ClientDP(clip_norm=1.0, noise_multiplier=1.0, delta=0.0)


@pytest.mark.parametrize(
    ("z", "rounds", "delta"), [(0.8, 5, 1e-5), (1.5, 50, 1e-6), (4.0, 1, 1e-3)]
)
def test_the_run_epsilon_is_the_accountants_at_sample_rate_one(
    z: float, rounds: int, delta: float
) -> None:
    dp = ClientDP(clip_norm=1.0, noise_multiplier=z, delta=delta)
    expected = get_epsilon(noise_multiplier=z, sample_rate=1.0, steps=rounds, delta=delta)[0]
    assert run_epsilon(dp, rounds) == pytest.approx(expected, rel=1e-12)
    # The same figure as a site's budget charged once per round.
    budget = PrivacyBudget(cap=math.inf, delta=delta)
    for _ in range(rounds):
        budget = budget.charge(round_mechanism(dp))
    assert budget.spent == pytest.approx(expected, rel=1e-9)
    # The plain Gaussian mechanism: RDP alpha * rounds / (2 z^2), best over the orders.
    alphas = np.array([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
    closed = alphas * rounds / (2 * z * z) - (math.log(delta) + np.log(alphas)) / (alphas - 1)
    closed += np.log((alphas - 1) / alphas)
    assert expected == pytest.approx(max(float(closed.min()), 0.0), rel=1e-9)
