"""Example-level DP (DP-SGD): the plan's dp block, the accounting, and local training."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from shared.errors import PlanError, PrivacyParameterError, TrainingError
from shared.models.registry import build_model
from shared.plan import TrainingPlan, demo_plan
from shared.privacy.accountant import get_epsilon
from shared.privacy.client_dp import protections
from shared.privacy.dp_sgd import (
    ExampleDP,
    round_mechanism,
    run_epsilon,
    sample_rate,
    steps_per_round,
)
from shared.training import train_local

EXAMPLE = {"level": "example", "noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-5}
CLIENT = {"clip_norm": 2.0, "noise_multiplier": 1.1, "delta": 1e-5}


def _plan(**overrides: Any) -> TrainingPlan:
    settings: dict[str, Any] = {
        "architecture": "mlp",
        "architecture_params": {"width": 4},
        "input_size": 32,
        "optimiser": "sgd",
        "learning_rate": 1.0,
        "momentum": 0.0,
        "local_epochs": 1,
        "batch_size": 16,
        "dp": EXAMPLE,
    }
    settings.update(overrides)
    return demo_plan(**settings)


def _data(n: int, scale: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = (rng.normal(size=(n, 1, 32, 32)) * scale).astype(np.float32)
    return images, (np.arange(n) % 2).astype(np.float32)


def _weights(model: torch.nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel().copy() for p in model.parameters()])


# -- the plan ------------------------------------------------------------------------------


def test_the_dp_block_selects_dp_sgd_with_level_example_and_round_trips() -> None:
    plan = _plan()
    assert plan.dp == ExampleDP(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
    assert plan.to_dict()["dp"] == EXAMPLE
    again = TrainingPlan.from_dict(plan.to_dict())
    assert again == plan and again.plan_hash == plan.plan_hash
    assert _plan(dp={**EXAMPLE, "noise_multiplier": 1.2}).plan_hash != plan.plan_hash
    # the per-site epsilon needs the site's number of images: the plan does not claim one
    assert plan.epsilon is None
    # client-level blocks are written as before (no "level"), so their hashes do not move
    client = demo_plan(weighting="uniform", dp=CLIENT)
    assert client.to_dict()["dp"] == CLIENT and client.epsilon is not None


@pytest.mark.parametrize(
    ("dp", "match"),
    [
        ({**EXAMPLE, "level": "site"}, r"Example-level dp must be"),
        ({k: v for k, v in EXAMPLE.items() if k != "max_grad_norm"}, r"Example-level dp must"),
        ({**EXAMPLE, "clip_norm": 1.0}, r"Example-level dp must be"),
        ({**EXAMPLE, "noise_multiplier": 0}, r"dp.noise_multiplier must be a finite number > 0"),
        ({**EXAMPLE, "max_grad_norm": float("inf")}, r"dp.max_grad_norm must be a finite"),
        ({**EXAMPLE, "delta": 1.0}, r"dp.delta must be a number strictly between 0 and 1"),
    ],
)
def test_invalid_example_dp_settings_are_refused_with_the_reason(dp: Any, match: str) -> None:
    with pytest.raises(PlanError, match=match) as info:
        _plan(dp=dp)
    assert info.value.code == "plan.invalid" and info.value.fields["field"] == "dp"


def test_a_model_with_batch_norm_is_refused_and_the_plan_says_what_to_choose() -> None:
    with pytest.raises(PlanError, match=r"cannot train small_cnn v1: its BatchNorm") as info:
        _plan(architecture="small_cnn", architecture_params={})
    assert "Choose an architecture without BatchNorm, such as small_cnn_gn" in info.value.message
    assert info.value.fields["field"] == "architecture"
    assert _plan(architecture="small_cnn_gn", architecture_params={}).dp is not None


def test_fedprox_is_refused_because_its_term_escapes_per_example_clipping() -> None:
    with pytest.raises(PlanError, match=r"cannot be combined with 'fedprox'"):
        _plan(aggregation="fedprox", aggregation_params={"mu": 0.01})


# -- the accounting ------------------------------------------------------------------------


def test_the_round_and_run_cost_are_the_accountants_at_the_implied_sample_rate() -> None:
    dp = ExampleDP(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
    assert sample_rate(32, 1000) == 0.032 and sample_rate(32, 20) == 1.0
    assert steps_per_round(2, 32, 1000) == 2 * 32  # ceil(1000 / 32) a pass
    mechanism = round_mechanism(dp, batch_size=32, num_samples=1000, steps=64)
    assert (mechanism.sample_rate, mechanism.steps) == (0.032, 64)
    expected = get_epsilon(noise_multiplier=1.1, sample_rate=0.032, steps=5 * 64, delta=1e-5)[0]
    got = run_epsilon(dp, batch_size=32, local_epochs=2, num_samples=1000, rounds=5)
    assert got == pytest.approx(expected, rel=1e-12)
    # more images per step (a smaller site, same batch) spend more
    assert run_epsilon(dp, batch_size=32, local_epochs=2, num_samples=200, rounds=5) > got
    with pytest.raises(PrivacyParameterError, match="number of training images must be"):
        sample_rate(32, 0)


# -- training --------------------------------------------------------------------------------


def test_dp_sgd_clips_each_step_to_the_gradient_bound() -> None:
    """One full-batch step of SGD at lr 1: the mean of per-example gradients clipped to C
    moves the weights by at most C, whatever the gradients were; without DP they move far."""
    images, labels = _data(16, scale=300.0)  # huge inputs: huge gradients
    bound = 0.05
    plan = _plan(dp={**EXAMPLE, "max_grad_norm": bound, "noise_multiplier": 1e-6})
    model = build_model("mlp", "1", input_size=32, params={"width": 4}, seed=0)
    start = _weights(model)
    result = train_local(model, images, labels, plan, seed=1, dp_seed=2)
    assert result.steps == 1 and result.num_samples == 16
    moved = float(np.linalg.norm(_weights(model) - start))
    assert 0 < moved <= bound * 1.001

    plain = build_model("mlp", "1", input_size=32, params={"width": 4}, seed=0)
    train_local(plain, images, labels, _plan(dp=None), seed=1)
    assert float(np.linalg.norm(_weights(plain) - start)) > 20 * bound


def test_dp_sgd_takes_the_accounted_steps_adds_noise_and_leaves_the_model_reusable() -> None:
    images, labels = _data(50)
    plan = _plan(local_epochs=2)
    runs = []
    for dp_seed in (3, 3, 4):
        model = build_model("mlp", "1", input_size=32, params={"width": 4}, seed=0)
        result = train_local(model, images, labels, plan, seed=1, dp_seed=dp_seed)
        assert result.steps == steps_per_round(2, 16, 50) == 8
        assert np.isfinite(result.mean_loss)
        runs.append(_weights(model))
    assert np.array_equal(runs[0], runs[1])  # the secret seed fixes sampling and noise
    assert not np.allclose(runs[0], runs[2])  # another seed, other noise
    # Opacus's hooks are gone: the same model trains again without DP (a warm worker)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    train_local(model, images, labels, _plan(dp=None), seed=1)


def test_the_registrys_group_norm_cnn_trains_with_dp_sgd() -> None:
    images, labels = _data(12)
    plan = _plan(architecture="small_cnn_gn", architecture_params={}, batch_size=6)
    model = build_model("small_cnn_gn", "1", input_size=32, seed=0)
    start = _weights(model)
    result = train_local(model, images, labels, plan, seed=1, dp_seed=5)
    assert result.steps == 2 and np.isfinite(_weights(model)).all()
    assert not np.array_equal(_weights(model), start)


def test_dp_sgd_refuses_a_model_with_batch_norm_given_directly() -> None:
    model = build_model("small_cnn", "1", input_size=32, seed=0)
    images, labels = _data(16)
    with pytest.raises(TrainingError, match="cannot be trained with DP-SGD") as info:
        train_local(model, images, labels, _plan(), seed=1)
    assert info.value.code == "training.model"


def test_the_reports_say_what_example_level_dp_protects() -> None:
    _, statement = protections(_plan(rounds=4).to_dict())
    assert statement.startswith("Example-level differential privacy (DP-SGD)")
    assert "L2 norm 1 and adds Gaussian noise (noise multiplier 1.1)" in statement
    assert "over 4 round(s) depends on its number of training images" in statement
