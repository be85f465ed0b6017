"""The site's record of charters, plan decisions, policy and the tree heads it checked."""

from __future__ import annotations

import pytest

from shared.crypto.keys import generate_signing_key, public_key_b64
from shared.crypto.signing import sign, verify
from shared.errors import GovernanceError, PlanError
from shared.governance.charter import charter_hash
from shared.governance.policy import SitePolicy
from shared.plan import demo_plan
from shared.protocol import signed
from shared.provenance.errors import ProvenanceError
from shared.provenance.log import ProvenanceLog
from site_client.core.governance import SiteGovernance

TEXT = "# Charter\n\n## Data use\nOnly updates leave.\n"


@pytest.fixture
def parties(tmp_path):
    coordinator, site_key = generate_signing_key(), generate_signing_key()
    record = SiteGovernance(
        tmp_path / "governance.db",
        federation="Fed",
        site_id="site-1",
        coordinator_key=public_key_b64(coordinator),
    )
    yield coordinator, site_key, record
    record.close()


def _charter_signature(coordinator, version, text=TEXT):
    fields = signed.charter_fields(federation="Fed", version=version, sha256=charter_hash(text))
    return sign(coordinator, signed.CHARTER, fields)


def test_accepting_a_charter_signs_exactly_what_was_offered(parties):
    coordinator, site_key, record = parties
    record.record_charter(1, charter_hash(TEXT), TEXT, _charter_signature(coordinator, 1), 1.0)
    message = record.accept_charter(1, "  Dr.  Grace Hopper ", site_key, now=2.0)
    assert message.person == "Dr. Grace Hopper"
    verify(
        public_key_b64(site_key),
        signed.CHARTER_ACCEPT,
        signed.charter_accept_fields(
            federation="Fed",
            site_id="site-1",
            version=1,
            sha256=charter_hash(TEXT),
            person="Dr. Grace Hopper",
        ),
        message.signature,
    )
    assert record.charter().accepted_by == "Dr. Grace Hopper"
    assert [a["kind"] for a in record.activity()] == ["charter_offered", "charter_accepted"]


def test_offers_that_do_not_check_out_are_not_kept(parties):
    coordinator, site_key, record = parties
    with pytest.raises(GovernanceError, match="does not match its hash"):
        record.record_charter(1, "ab" * 32, TEXT, _charter_signature(coordinator, 1), 1.0)
    with pytest.raises(GovernanceError, match="not signed by this federation's coordinator"):
        record.record_charter(1, charter_hash(TEXT), TEXT, _charter_signature(site_key, 1), 1.0)
    assert record.charter() is None
    with pytest.raises(GovernanceError, match="has not been received"):
        record.accept_charter(1, "Dr. X", site_key, now=2.0)
    plan = demo_plan()
    with pytest.raises(GovernanceError, match="not signed by this federation's coordinator"):
        record.record_plan(plan.plan_hash, plan.to_dict(), "forged", 1.0)
    with pytest.raises(GovernanceError, match="does not match its hash"):
        record.record_plan("cd" * 32, plan.to_dict(), "forged", 1.0)
    unknown_model = {**plan.to_dict(), "architecture": "vit_huge"}
    with pytest.raises(PlanError, match="update Tessera at this site"):
        record.record_plan("cd" * 32, unknown_model, "forged", 1.0)
    assert record.plans() == []


def test_plan_decisions(parties):
    coordinator, site_key, record = parties
    plan = demo_plan()
    sig = sign(coordinator, signed.PLAN, signed.plan_fields(plan_hash=plan.plan_hash))
    record.record_plan(plan.plan_hash, plan.to_dict(), sig, 1.0)
    assert record.plan(plan.plan_hash).decision == "pending"
    assert not record.approved(plan.plan_hash)
    with pytest.raises(GovernanceError, match="say why the plan is refused"):
        record.decide_plan(
            plan.plan_hash, approve=False, reason=" ", person="A", key=site_key, now=2
        )
    with pytest.raises(GovernanceError, match="name of the person deciding"):
        record.decide_plan(plan.plan_hash, approve=True, reason="", person=" ", key=site_key, now=2)
    refusal = record.decide_plan(
        plan.plan_hash, approve=False, reason="Too many rounds", person="A", key=site_key, now=3
    )
    assert refusal.decision == "refuse" and not record.approved(plan.plan_hash)
    record.decide_plan(plan.plan_hash, approve=True, reason="", person="A", key=site_key, now=4)
    assert record.approved(plan.plan_hash)
    assert record.plan_decision(plan.plan_hash).decision == "approve"


def test_policy_and_witness_survive_reopening(parties, tmp_path):
    coordinator, _, record = parties
    policy = SitePolicy(max_epsilon=5.0, training_hours="19:00-07:00", cpu_share=0.25)
    record.set_policy(policy, now=1.0)
    log = ProvenanceLog()
    for n in range(3):
        log.append("event", {"n": n}, at=float(n))
    witness = record.witness()
    witness.observe(log.head(coordinator, 5.0), [])
    record.save_witness(witness, now=5.0)
    record.close()
    again = SiteGovernance(
        tmp_path / "governance.db",
        federation="Fed",
        site_id="site-1",
        coordinator_key=public_key_b64(coordinator),
    )
    assert again.policy() == policy
    assert again.witness().head.size == 3
    # a rewritten history is refused against what was saved
    rewritten = ProvenanceLog()
    for n in range(4):
        rewritten.append("event", {"n": n if n != 1 else 99}, at=float(n))
    with pytest.raises(ProvenanceError, match="record of history changed"):
        again.witness().observe(rewritten.head(coordinator, 6.0), rewritten.consistency(3))
    again.close()
