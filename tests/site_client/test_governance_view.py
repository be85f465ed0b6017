"""The Governance page's core: snapshot, signed decisions, the policy check and the policy form,
on a real site folder (enrolment record, site key file, SQLite governance record)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shared.crypto.keys import generate_signing_key, public_key_b64, save_private_key
from shared.crypto.signing import sign, verify
from shared.errors import GovernanceError
from shared.governance.charter import charter_hash
from shared.governance.policy import SitePolicy
from shared.plan import demo_plan
from shared.protocol import signed
from site_client.core.activity import open_governance
from site_client.core.config import SiteConfig, SiteDir
from site_client.core.governance_view import (
    PolicyForm,
    accept_charter,
    decide_plan,
    decision_problem,
    load_governance_view,
    parse_policy_form,
    policy_form,
    save_policy,
)

CHARTER = "# Charter\n\n## Data use\nOnly updates leave.\n"


@pytest.fixture
def site(tmp_path: Path):
    """An enrolled site folder with its key, and the coordinator key that signs offers."""
    coordinator, site_key = generate_signing_key(), generate_signing_key()
    site_dir = SiteDir(tmp_path / "site")
    site_dir.save(
        SiteConfig(
            site_id="site-1",
            site_name="North",
            federation="Fed",
            coordinator_url="wss://c.test:8443",
            fingerprint="ab" * 32,
            coordinator_key=public_key_b64(coordinator),
            enrolled_at=1.0,
        )
    )
    save_private_key(site_key, site_dir.key_file)
    return site_dir, coordinator, site_key


def _offer_charter(site_dir: SiteDir, coordinator, version: int, text: str = CHARTER) -> None:
    fields = signed.charter_fields(federation="Fed", version=version, sha256=charter_hash(text))
    governance = open_governance(site_dir)
    try:
        governance.record_charter(
            version, charter_hash(text), text, sign(coordinator, signed.CHARTER, fields), 10.0
        )
    finally:
        governance.close()


def _offer_plan(site_dir: SiteDir, coordinator, **overrides) -> str:
    plan = demo_plan(rounds=3, **overrides)
    signature = sign(coordinator, signed.PLAN, signed.plan_fields(plan_hash=plan.plan_hash))
    governance = open_governance(site_dir)
    try:
        governance.record_plan(plan.plan_hash, plan.to_dict(), signature, 20.0)
    finally:
        governance.close()
    return plan.plan_hash


def test_a_site_with_nothing_offered_yet(site) -> None:
    site_dir, _, _ = site
    view = load_governance_view(site_dir)
    assert view.charter is None and view.plans == () and view.history == ()
    assert "No charter has been received" in view.charter_status
    assert view.policy == SitePolicy()
    with pytest.raises(GovernanceError, match="has not been received from the coordinator"):
        accept_charter(site_dir, 1, "Dr. Ada Byron", now=30.0)


def test_accepting_the_charter_signs_it_with_the_site_key(site) -> None:
    site_dir, coordinator, site_key = site
    _offer_charter(site_dir, coordinator, 1)
    view = load_governance_view(site_dir)
    assert view.charter.version == 1 and view.charter.sha256 == charter_hash(CHARTER)
    assert "has not been accepted yet" in view.charter_status
    with pytest.raises(GovernanceError, match="Type your name first"):
        accept_charter(site_dir, 1, "   ", now=30.0)

    message = accept_charter(site_dir, 1, "  Dr. Ada   Byron ", now=time.time())
    verify(
        public_key_b64(site_key),
        signed.CHARTER_ACCEPT,
        signed.charter_accept_fields(
            federation="Fed",
            site_id="site-1",
            version=1,
            sha256=charter_hash(CHARTER),
            person="Dr. Ada Byron",
        ),
        message.signature,
    )
    view = load_governance_view(site_dir)
    assert view.charter_status.startswith("Version 1 was accepted and signed by Dr. Ada Byron")
    (entry,) = view.history
    assert entry.signed and entry.person == "Dr. Ada Byron"
    assert entry.text.startswith("Dr. Ada Byron accepted charter version 1")

    # a new version needs a new signature, and the page says so
    _offer_charter(site_dir, coordinator, 2, CHARTER + "\n## Disputes\nTalk first.\n")
    view = load_governance_view(site_dir)
    assert view.charter.version == 2 and view.charter.accepted_by is None
    assert "An earlier version was accepted; a new version needs a new signature" in (
        view.charter_status
    )


def test_approving_and_refusing_a_plan(site) -> None:
    site_dir, coordinator, site_key = site
    plan_hash = _offer_plan(site_dir, coordinator)
    (plan,) = load_governance_view(site_dir).plans
    assert plan.title == f"'demo-binary-small-cnn' ({plan_hash[:12]})"
    assert plan.meets_policy and plan.can_approve and plan.can_refuse
    assert plan.status() == plan.short_status() == "waiting for a decision"
    assert dict(plan.summary.lines)["How long"].startswith("3 rounds")

    with pytest.raises(GovernanceError, match="Say why the plan is refused") as caught:
        decide_plan(site_dir, plan_hash, approve=False, reason="  ", person="A", now=30.0)
    assert caught.value.code == "governance.reason_required"
    assert load_governance_view(site_dir).plans[0].record.decision == "pending"

    refusal = decide_plan(
        site_dir, plan_hash, approve=False, reason="Too many rounds", person="Dr. B", now=40.0
    )
    verify(
        public_key_b64(site_key),
        signed.PLAN_DECISION,
        signed.plan_decision_fields(
            federation="Fed",
            site_id="site-1",
            plan_hash=plan_hash,
            decision="refuse",
            reason="Too many rounds",
            person="Dr. B",
        ),
        refusal.signature,
    )
    (plan,) = load_governance_view(site_dir).plans
    assert plan.record.decision == "refuse" and not plan.can_refuse and plan.can_approve
    assert plan.status().startswith("refused by Dr. B on ")
    assert plan.status().endswith(": Too many rounds")

    decide_plan(site_dir, plan_hash, approve=True, reason="", person="Dr. C", now=50.0)
    view = load_governance_view(site_dir)
    assert view.plans[0].record.decision == "approve" and not view.plans[0].can_approve
    assert (
        [e.text for e in view.history]
        == [  # newest first, plans named as offered
            f"Dr. C approved plan 'demo-binary-small-cnn' ({plan_hash[:12]})",
            f"Dr. B refused plan 'demo-binary-small-cnn' ({plan_hash[:12]}): Too many rounds",
        ]
    )


def test_a_plan_below_the_policy_cannot_be_approved(site) -> None:
    site_dir, coordinator, _ = site
    plan_hash = _offer_plan(site_dir, coordinator)
    assert load_governance_view(site_dir).plans[0].can_approve  # the view is drawn...
    # ...then the policy is tightened: the decision is checked against the policy of now
    save_policy(site_dir, SitePolicy(require_secure_aggregation=True, max_epsilon=4), now=30)
    with pytest.raises(GovernanceError, match="below this site's policy") as caught:
        decide_plan(site_dir, plan_hash, approve=True, reason="", person="Dr. A", now=31.0)
    assert caught.value.code == "governance.below_policy"
    assert "requires secure aggregation" in caught.value.message
    view = load_governance_view(site_dir)
    (plan,) = view.plans
    assert plan.record.decision == "pending" and not plan.can_approve and plan.can_refuse
    assert len(plan.refusals) == 2 and "epsilon 4" in plan.refusals[1]
    assert plan.status() == "waiting for a decision (below this site's policy)"
    assert plan.short_status() == "below this site's policy"
    # refusing it is still possible, and the policy change is in the history
    decide_plan(site_dir, plan_hash, approve=False, reason="Below policy", person="A", now=32)
    kinds = [e.kind for e in load_governance_view(site_dir).history]
    assert kinds == ["plan_refused", "policy_changed"]


def test_decision_problems() -> None:
    assert decision_problem(approve=True, reason="", person="A") is None
    assert decision_problem(approve=False, reason="No.", person="A") is None
    assert "Type your name" in decision_problem(approve=True, reason="", person=" ")
    assert "at most 200" in decision_problem(approve=True, reason="", person="x" * 201)
    assert "Say why" in decision_problem(approve=False, reason="\n", person="A")
    below = decision_problem(approve=True, reason="", person="A", refusals=["Too leaky."])
    assert below == "This plan is below this site's policy and cannot be approved: Too leaky."


def _form(**changes) -> PolicyForm:
    base = dict(
        require_secure_aggregation=True,
        max_epsilon="3",
        max_delta="1e-6",
        training_hours="19:00 - 07:00",
        cpu_percent=25,
    )
    return PolicyForm(**{**base, **changes})


def test_the_policy_form_reads_and_checks_each_field(site) -> None:
    policy = parse_policy_form(_form())
    assert policy == SitePolicy(
        require_secure_aggregation=True,
        max_epsilon=3.0,
        max_delta=1e-6,
        training_hours="19:00-07:00",
        cpu_share=0.25,
    )
    assert parse_policy_form(policy_form(policy)) == policy  # the form shows what it saved
    relaxed = parse_policy_form(_form(max_epsilon=" ", max_delta="", training_hours=""))
    assert (relaxed.max_epsilon, relaxed.max_delta, relaxed.training_hours) == (None, 1e-5, None)
    assert parse_policy_form(_form(max_epsilon="2,5")).max_epsilon == 2.5  # decimal comma

    with pytest.raises(GovernanceError, match=r"must be a number, like 3 or 0\.5") as caught:
        parse_policy_form(
            _form(max_epsilon="lots", max_delta="2", training_hours="25:00-07:00", cpu_percent=0)
        )
    errors = caught.value.fields["errors"]
    assert sorted(errors) == ["cpu_share", "max_delta", "max_epsilon", "training_hours"]
    assert "not 'lots'" in errors["max_epsilon"]
    assert "between 0 and 1" in errors["max_delta"]
    assert "must look like 19:00-07:00" in errors["training_hours"]
    assert "share of the CPU" in errors["cpu_share"]
    with pytest.raises(GovernanceError, match="must be a number above 0") as caught:
        parse_policy_form(_form(max_epsilon="-1"))
    assert list(caught.value.fields["errors"]) == ["max_epsilon"]

    site_dir, _, _ = site
    assert save_policy(site_dir, policy, now=5.0) == policy
    assert load_governance_view(site_dir).policy == policy
