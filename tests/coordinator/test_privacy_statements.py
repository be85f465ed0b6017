"""What the operator and the ethics board are told about a run's privacy protections."""

from __future__ import annotations

import pytest

from coordinator.cli import main
from coordinator.report import _privacy
from shared.plan import demo_plan
from shared.privacy.accountant import get_epsilon
from shared.privacy.client_dp import protections

DP = {"clip_norm": 2.0, "noise_multiplier": 0.9, "delta": 1e-6}


def test_a_dp_plan_states_its_mechanism_and_the_accountants_epsilon() -> None:
    plan = demo_plan(rounds=6, weighting="uniform", dp=DP).to_dict()
    epsilon = get_epsilon(noise_multiplier=0.9, sample_rate=1.0, steps=6, delta=1e-6)[0]
    secure, private = protections(plan)
    assert secure.startswith("No secure aggregation: the coordinator sees each site's")
    assert "clips its update to L2 norm 2 and adds Gaussian noise of standard deviation 1.8" in (
        private
    )
    assert f"over 6 round(s) a site spends at most epsilon {epsilon:.4g} at delta 1e-06" in private
    page = _privacy(plan)
    assert f"epsilon {epsilon:.4g}" in page and "No differential privacy" not in page


def test_a_plan_without_dp_claims_no_budget() -> None:
    lines = protections(demo_plan().to_dict())
    assert lines[1] == "No differential privacy: no privacy budget (epsilon) is spent or claimed."
    assert "No differential privacy" in _privacy(demo_plan().to_dict())


def test_demo_secure_aggregation_flag_reaches_the_demo(monkeypatch) -> None:
    import coordinator.demo

    asked: dict = {}
    monkeypatch.setattr(coordinator.demo, "run_demo", lambda **kw: asked.update(kw) or 0)
    assert main(["demo", "--secure-aggregation", "--dp", "--rounds", "2"]) == 0
    assert asked["secure_aggregation"] is True and asked["dp"] is True and asked["rounds"] == 2
    plan = demo_plan(secure_aggregation=True, weighting="uniform", max_update_norm=5.0)
    assert protections(plan.to_dict())[0].startswith("Secure aggregation: the coordinator sees")
    dp = {"clip_norm": 2.0, "noise_multiplier": 0.9, "delta": 1e-6}
    private = demo_plan(secure_aggregation=True, weighting="uniform", dp=dp)
    assert (
        "adds its share of Gaussian noise, so that the sum the coordinator sees carries "
        in (protections(private.to_dict())[1])
    )


def test_demo_help_lists_the_privacy_flags(capsys) -> None:
    with pytest.raises(SystemExit, match="0"):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "--dp" in out and "--secure-aggregation" in out
