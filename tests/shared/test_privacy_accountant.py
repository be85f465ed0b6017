"""The RDP accountant agrees with Opacus's and behaves like a privacy accountant must."""

from __future__ import annotations

import ast
import math
import warnings
from pathlib import Path

import numpy as np

# Opacus is a dev dependency (pyproject's ``dev`` extra): if it is missing this file fails
# loudly rather than skipping. Only the tests import it, never shared/privacy.
import opacus.accountants.analysis.rdp as opacus_analysis
import opacus.accountants.rdp as opacus_rdp
import pytest

from shared.errors import PrivacyBudgetExceeded, PrivacyParameterError
from shared.privacy.accountant import (
    DEFAULT_ORDERS,
    PrivacyBudget,
    SampledGaussian,
    compute_rdp,
    epsilon_from_rdp,
    get_epsilon,
)

NOISE = (0.5, 0.8, 1.0, 2.0, 5.0)
RATES = (0.01, 0.05, 0.2, 1.0)
STEPS = (1, 10, 100, 1000)
DELTAS = (1e-3, 1e-5, 1e-7)


def _opacus_epsilon(noise: float, rate: float, steps: int, delta: float) -> tuple[float, float]:
    """What Opacus's RDPAccountant reports after ``steps`` identical steps.

    Its accountant keeps (noise, rate, count) and calls ``compute_rdp(steps=count)``, which
    is ``steps`` times one step's curve; we call the same two functions it calls, with one
    step's curve computed once per (noise, rate) to keep the grid fast.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns when the best order is at the edge
        eps, order = opacus_analysis.get_privacy_spent(
            orders=opacus_rdp.RDPAccountant.DEFAULT_ALPHAS,
            rdp=_opacus_curve(noise, rate) * steps,
            delta=delta,
        )
    return float(eps), float(order)


_CURVES: dict[tuple[float, float], np.ndarray] = {}


def _opacus_curve(noise: float, rate: float) -> np.ndarray:
    if (noise, rate) not in _CURVES:
        _CURVES[noise, rate] = np.asarray(
            opacus_analysis.compute_rdp(
                q=rate,
                noise_multiplier=noise,
                steps=1,
                orders=opacus_rdp.RDPAccountant.DEFAULT_ALPHAS,
            )
        )
    return _CURVES[noise, rate]


def test_default_orders_are_opacus_defaults() -> None:
    assert list(DEFAULT_ORDERS) == list(opacus_rdp.RDPAccountant.DEFAULT_ALPHAS)


@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("rate", RATES)
def test_agrees_with_opacus_within_one_percent(noise: float, rate: float) -> None:
    for steps in STEPS:
        for delta in DELTAS:
            ours, order = get_epsilon(
                noise_multiplier=noise, sample_rate=rate, steps=steps, delta=delta
            )
            theirs, their_order = _opacus_epsilon(noise, rate, steps, delta)
            assert ours == pytest.approx(theirs, rel=0.01), (noise, rate, steps, delta)
            assert order == their_order


def test_agrees_with_the_opacus_accountant_object_itself() -> None:
    accountant = opacus_rdp.RDPAccountant()
    for _ in range(30):
        accountant.step(noise_multiplier=1.1, sample_rate=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, their_order = accountant.get_privacy_spent(delta=1e-5)
    ours, order = get_epsilon(noise_multiplier=1.1, sample_rate=0.02, steps=30, delta=1e-5)
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert order == their_order


def test_full_participation_is_the_gaussian_mechanism() -> None:
    # q = 1: RDP(alpha) = alpha / (2 sigma^2) per step (Mironov 2017, Proposition 7).
    rdp = compute_rdp(1.0, 2.0, 5, orders=[2.0, 10.0])
    np.testing.assert_allclose(rdp, [5 * 2 / 8, 5 * 10 / 8])


def test_known_value_from_the_opacus_docs() -> None:
    # The worked example in opacus.accountants.analysis.rdp's docstring: 0.336 at order 23.
    orders = range(2, 33)
    rdp = compute_rdp(1e-5, 1.0, 10, orders) + compute_rdp(1e-4, 3.0, 4, orders)
    eps, order = epsilon_from_rdp(rdp, 1e-5, orders)
    assert eps == pytest.approx(0.336, abs=5e-4)
    assert order == 23


def test_epsilon_grows_with_steps_and_sample_rate_and_falls_with_noise_and_delta() -> None:
    def eps(noise: float = 1.0, rate: float = 0.1, steps: int = 50, delta: float = 1e-5) -> float:
        return get_epsilon(noise_multiplier=noise, sample_rate=rate, steps=steps, delta=delta)[0]

    assert eps(steps=10) < eps(steps=50) < eps(steps=500)
    assert eps(rate=0.01) < eps(rate=0.1) < eps(rate=1.0)
    assert eps(noise=3.0) < eps(noise=1.0) < eps(noise=0.6)
    assert eps(delta=1e-3) < eps(delta=1e-5) < eps(delta=1e-7)


def test_rdp_is_additive_over_steps() -> None:
    one = compute_rdp(0.05, 1.3, 1)
    np.testing.assert_allclose(compute_rdp(0.05, 1.3, 40), 40 * one)


def test_no_noise_means_no_privacy_and_no_steps_means_none_spent() -> None:
    eps, order = get_epsilon(noise_multiplier=0.0, sample_rate=0.5, steps=1, delta=1e-5)
    assert eps == math.inf and math.isnan(order)
    eps, order = get_epsilon(noise_multiplier=1.0, sample_rate=0.5, steps=0, delta=1e-5)
    assert eps == 0.0 and math.isnan(order)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": -1.0}, "noise multiplier must be a finite number >= 0"),
        ({"noise_multiplier": math.nan}, "noise multiplier must be a finite number >= 0"),
        ({"sample_rate": 1.5}, "sample rate must be a number from 0 to 1"),
        ({"sample_rate": -0.1}, "sample rate must be a number from 0 to 1"),
        ({"steps": -3}, "number of steps must be a whole number >= 0"),
        ({"steps": 2.5}, "number of steps must be a whole number >= 0"),
        ({"delta": 0.0}, "delta must be strictly between 0 and 1"),
        ({"delta": 1.0}, "delta must be strictly between 0 and 1"),
        ({"orders": [1.0, 2.0]}, "RDP orders must be a non-empty sequence of finite numbers > 1"),
        ({"orders": []}, "RDP orders must be a non-empty sequence"),
    ],
)
def test_invalid_inputs_are_clear_errors(kwargs: dict, match: str) -> None:
    args = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "delta": 1e-5, **kwargs}
    with pytest.raises(PrivacyParameterError, match=match) as info:
        get_epsilon(**args)
    assert info.value.code.startswith("privacy.bad_")


def test_rdp_curve_must_match_the_orders() -> None:
    with pytest.raises(PrivacyParameterError, match="3 values but there are 2 orders"):
        epsilon_from_rdp([0.1, 0.2, 0.3], 1e-5, [2.0, 3.0])


def test_budget_composes_in_rdp_and_refuses_the_round_past_the_cap() -> None:
    round_ = SampledGaussian(noise_multiplier=1.1, sample_rate=1.0)
    one_round = get_epsilon(noise_multiplier=1.1, sample_rate=1.0, steps=1, delta=1e-5)[0]
    budget = PrivacyBudget(cap=8.0, delta=1e-5)
    assert budget.spent == 0.0 and budget.remaining == 8.0
    assert not budget.would_exceed(round_)
    budget = budget.charge(round_)
    assert budget.spent == pytest.approx(one_round)
    budget = budget.charge(round_)
    two = get_epsilon(noise_multiplier=1.1, sample_rate=1.0, steps=2, delta=1e-5)[0]
    assert budget.spent == pytest.approx(two)
    assert budget.spent < 2 * one_round  # RDP composition is tighter than adding epsilons
    assert budget.would_exceed(round_)
    assert budget.epsilon_after(round_) > 8.0
    with pytest.raises(PrivacyBudgetExceeded, match="beyond this site's limit of 8") as info:
        budget.charge(round_)
    assert info.value.code == "privacy.budget_exceeded"
    assert budget.spent == pytest.approx(two)  # a refused round costs nothing


def test_budget_mixes_rounds_with_different_settings() -> None:
    a = SampledGaussian(noise_multiplier=1.0, sample_rate=0.1, steps=20)
    b = SampledGaussian(noise_multiplier=2.0, sample_rate=0.5, steps=3)
    budget = PrivacyBudget(cap=100.0, delta=1e-6).charge(a).charge(b)
    expected = epsilon_from_rdp(a.rdp() + b.rdp(), 1e-6)[0]
    assert budget.spent == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cap": 0.0}, "epsilon cap must be a number > 0"),
        ({"cap": math.nan}, "epsilon cap must be a number > 0"),
        ({"delta": 2.0}, "delta must be strictly between 0 and 1"),
    ],
)
def test_invalid_budget(kwargs: dict, match: str) -> None:
    with pytest.raises(PrivacyParameterError, match=match):
        PrivacyBudget(**{"cap": 1.0, "delta": 1e-5, **kwargs})


def test_invalid_round() -> None:
    with pytest.raises(PrivacyParameterError, match="sample rate must be a number from 0 to 1"):
        SampledGaussian(noise_multiplier=1.0, sample_rate=2.0)


def test_the_accountant_does_not_import_opacus_or_scipy() -> None:
    source = Path(__file__).resolve().parents[2] / "shared" / "privacy"
    for path in source.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in {"opacus", "scipy"}, (path.name, name)


def test_operator_command_prints_epsilon(capsys: pytest.CaptureFixture[str]) -> None:
    from coordinator.cli import main

    args = ["--noise-multiplier", "1.1", "--sample-rate", "0.01", "--steps", "1000"]
    assert main(["privacy", "epsilon", *args, "--delta", "1e-5"]) == 0
    expected = get_epsilon(noise_multiplier=1.1, sample_rate=0.01, steps=1000, delta=1e-5)[0]
    assert capsys.readouterr().out == f"epsilon={expected:.6g}\n"
    assert main(["privacy", "epsilon", *args, "--delta", "2"]) == 2
    assert "error [privacy.bad_delta]: delta must be strictly between 0 and 1" in (
        capsys.readouterr().err
    )
