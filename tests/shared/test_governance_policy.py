"""The site policy: the floor each plan must meet, hours, CPU share."""

from __future__ import annotations

import pytest

from shared.errors import GovernanceError
from shared.governance.policy import SitePolicy, plan_refusals


def test_default_policy_accepts_a_plain_plan():
    assert plan_refusals(SitePolicy(), epsilon=None) == []


def test_secure_aggregation_required():
    policy = SitePolicy(require_secure_aggregation=True)
    (reason,) = plan_refusals(policy, epsilon=None)
    assert "requires secure aggregation" in reason
    assert plan_refusals(policy, epsilon=None, secure_aggregation=True) == []


def test_epsilon_cap():
    policy = SitePolicy(max_epsilon=3.0)
    (no_dp,) = plan_refusals(policy, epsilon=None)
    assert "requires differential privacy" in no_dp and "epsilon 3" in no_dp
    (too_much,) = plan_refusals(policy, epsilon=7.25)
    assert "epsilon 7.25, more than the 3" in too_much
    assert plan_refusals(policy, epsilon=2.9, delta=1e-6) == []
    (delta,) = plan_refusals(policy, epsilon=2.0, delta=1e-3)
    assert "delta 0.001 is above" in delta


@pytest.mark.parametrize(
    ("hours", "minute", "allowed"),
    [
        (None, 12 * 60, True),
        ("19:00-07:00", 18 * 60 + 59, False),
        ("19:00-07:00", 19 * 60, True),
        ("19:00-07:00", 3 * 60, True),
        ("19:00-07:00", 7 * 60, False),
        ("08:30-17:00", 12 * 60, True),
        ("08:30-17:00", 17 * 60, False),
        ("00:00-00:00", 5, True),
    ],
)
def test_training_hours(hours, minute, allowed):
    assert SitePolicy(training_hours=hours).may_train_at(minute) is allowed


def test_cpu_share_gives_threads():
    assert SitePolicy(cpu_share=0.5).threads(8) == 4
    assert SitePolicy(cpu_share=0.1).threads(2) == 1
    assert SitePolicy(cpu_share=1.0).threads(16) == 16


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_epsilon": 0.0}, "above 0"),
        ({"max_epsilon": float("inf")}, "above 0"),
        ({"training_hours": "7pm-7am"}, "must look like 19:00-07:00"),
        ({"cpu_share": 0.0}, "share of the CPU"),
        ({"max_delta": 1.0}, "delta must be between 0 and 1"),
    ],
)
def test_invalid_policies_are_refused(fields, message):
    with pytest.raises(GovernanceError, match=message):
        SitePolicy(**fields)


def test_round_trip_and_unknown_settings():
    policy = SitePolicy(max_epsilon=4.0, training_hours="20:00-06:00", cpu_share=0.25)
    assert SitePolicy.from_dict(policy.to_dict()) == policy
    with pytest.raises(GovernanceError, match="Unknown policy settings: colour"):
        SitePolicy.from_dict({"colour": "blue"})
