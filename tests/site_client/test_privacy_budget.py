"""A plan's privacy at the site: its epsilon in the summary and the policy check, and the
site-owned budget that refuses a round which would pass the policy's cap."""

from __future__ import annotations

import time

import pytest

from coordinator import governance
from shared.governance.policy import SitePolicy, plan_refusals
from shared.plan import demo_plan
from shared.privacy.accountant import get_epsilon
from site_client.core.governance_view import plan_privacy
from site_client.core.plan_summary import summarise

DP = {"clip_norm": 1.0, "noise_multiplier": 1.5, "delta": 1e-5}


def _eps(rounds: int) -> float:
    return get_epsilon(noise_multiplier=1.5, sample_rate=1.0, steps=rounds, delta=1e-5)[0]


def test_plan_privacy_is_the_accountants_epsilon_and_the_summary_and_policy_use_it() -> None:
    plan = demo_plan(rounds=4, weighting="uniform", dp=DP)
    privacy = plan_privacy(plan)
    assert privacy.epsilon == pytest.approx(_eps(4), rel=1e-12)
    assert privacy.delta == 1e-5 and privacy.secure_aggregation is False
    lines = dict(summarise(plan, epsilon=privacy.epsilon, delta=privacy.delta).lines)
    assert f"epsilon {_eps(4):.2f} at delta 1e-05 for the whole run" in lines["Privacy budget"]
    tight = SitePolicy(max_epsilon=_eps(4) - 0.5)
    (reason,) = plan_refusals(tight, epsilon=privacy.epsilon, delta=privacy.delta)
    assert f"epsilon {_eps(4):.2f}, more than the {_eps(4) - 0.5:g}" in reason
    assert plan_refusals(SitePolicy(max_epsilon=_eps(4) + 0.5), epsilon=privacy.epsilon) == []
    assert plan_privacy(demo_plan()).epsilon is None


def test_a_round_that_would_pass_the_cap_is_refused_and_says_why(world) -> None:
    fed, site_id, link = world
    plan = demo_plan(rounds=3, weighting="uniform", dp=DP)
    cap = _eps(3) + 0.01  # the whole plan fits; a fourth round (a retry) would not
    link.record.set_policy(SitePolicy(max_epsilon=cap), now=4.0)
    plan_hash = fed.add_plan(plan, now=5.0)
    fed.start_run(plan_hash, now=6.0)
    assert link.on_notice(governance.notice(fed, site_id), now=7.0) == []  # meets the policy
    link.record.decide_plan(plan_hash, approve=True, reason="", person="A", key=link.key, now=8)
    now = time.time()
    assert link.privacy_budget(plan_hash).spent == 0.0
    for rnd in (1, 2, 3):
        assert link.refusal(plan_hash, now, run_id="r1", rnd=rnd) is None
        # The same round asked again (the update is sent again) is not charged twice.
        assert link.refusal(plan_hash, now, run_id="r1", rnd=rnd) is None
        assert link.privacy_budget(plan_hash).spent == pytest.approx(_eps(rnd), rel=1e-9)
    code, reason = link.refusal(plan_hash, now, run_id="r1", rnd=4)
    assert code == "privacy.budget_exceeded"
    assert f"epsilon {_eps(4):.3g}, beyond this site's limit of {cap:.3g}" in reason
    assert f"{_eps(3):.3g} spent so far" in reason
    spent = [a["detail"] for a in link.record.activity() if a["kind"] == "privacy_spent"]
    assert [(s["run_id"], s["round"]) for s in spent] == [("r1", 1), ("r1", 2), ("r1", 3)]
    assert spent[-1]["epsilon"] == pytest.approx(_eps(3), rel=1e-9)
    assert link.privacy_budget("0" * 64) is None  # an unknown plan has no budget here


def test_lowering_the_cap_mid_run_stops_the_site(world) -> None:
    fed, site_id, link = world
    plan = demo_plan(rounds=5, weighting="uniform", dp=DP)
    plan_hash = fed.add_plan(plan, now=5.0)
    fed.start_run(plan_hash, now=6.0)
    link.on_notice(governance.notice(fed, site_id), now=7.0)
    link.record.decide_plan(plan_hash, approve=True, reason="", person="A", key=link.key, now=8)
    now = time.time()
    assert link.refusal(plan_hash, now) is None  # no cap: spent is still recorded
    assert link.refusal(plan_hash, now) is None
    # The hospital lowers its cap between the whole plan's epsilon and what is spent: the
    # plan is now below the policy, so the site declines before its budget is even asked.
    link.record.set_policy(SitePolicy(max_epsilon=_eps(2) + 0.01), now=9.0)
    code, reason = link.refusal(plan_hash, now)
    assert code == "governance.below_policy" and "more than the" in reason
