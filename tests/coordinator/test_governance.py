"""Charter signatures, plan decisions, validations and tree heads between a site and the
coordinator, through the real stores and signatures (the network is tested in test_server)."""

from __future__ import annotations

import pytest

from coordinator import governance
from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from shared.crypto.keys import generate_signing_key, public_key_b64
from shared.crypto.signing import sign
from shared.errors import GovernanceError
from shared.identity.invitation import decode_invitation, token_digest
from shared.plan import demo_plan
from shared.protocol import signed
from shared.protocol.messages import HeadRequest, ValidationReport
from shared.provenance.log import LogEntry, TreeHead
from site_client.core.governance import SiteGovernance

from .conftest import CHARTER, build_finished_run


@pytest.fixture
def world(tmp_path):
    fed = Federation.init(
        tmp_path / "coord", CoordinatorConfig(federation="Gov test", host="127.0.0.1"), now=1.0
    )
    key = generate_signing_key()
    token = decode_invitation(fed.invite("West Hospital", now=2.0)).token
    site = fed.store.redeem_invitation(token_digest(token), public_key_b64(key), 3.0)
    record = SiteGovernance(
        tmp_path / "site-governance.db",
        federation="Gov test",
        site_id=site.site_id,
        coordinator_key=fed.public_key(),
    )
    yield fed, site.site_id, key, record
    record.close()
    fed.close()


def _receive(record, notice, now=10.0):
    if notice.charter_text:
        record.record_charter(
            notice.charter_version,
            notice.charter_sha256,
            notice.charter_text,
            notice.charter_signature,
            now,
        )
    for item in notice.plans:
        record.record_plan(item["plan_hash"], item["plan"], item["plan_signature"], now)


def test_without_a_charter_every_site_is_eligible(world):
    fed, site_id, _, _ = world
    assert governance.ineligibility(fed, site_id) is None
    assert governance.notice(fed, site_id).charter_version == 0


def test_a_site_is_eligible_only_once_it_signed_the_current_charter(world):
    fed, site_id, key, record = world
    fed.publish_charter(CHARTER.read_bytes(), now=5.0)
    assert governance.ineligibility(fed, site_id) == "has not signed charter version 1"
    notice = governance.notice(fed, site_id)
    assert notice.charter_text == CHARTER.read_text() and not notice.charter_signed
    _receive(record, notice)
    signature = record.accept_charter(1, "Dr. Ada Byron", key, now=11.0)
    governance.record_charter_signature(fed, site_id, signature, now=12.0)
    assert governance.ineligibility(fed, site_id) is None
    again = governance.notice(fed, site_id)
    assert again.charter_signed and again.charter_text == ""  # no need to resend the text
    (event,) = fed.store.events("charter_signed")
    assert event["detail"]["person"] == "Dr. Ada Byron"
    # a new version needs a new signature
    fed.publish_charter(CHARTER.read_bytes() + b"\n## Dispute resolution, amended\n", now=20.0)
    assert governance.ineligibility(fed, site_id) == "has not signed charter version 2"


def test_a_forged_charter_signature_is_refused_and_not_recorded(world):
    fed, site_id, _, record = world
    fed.publish_charter(CHARTER.read_bytes(), now=5.0)
    _receive(record, governance.notice(fed, site_id))
    forged = record.accept_charter(1, "Mallory", generate_signing_key(), now=11.0)
    with pytest.raises(GovernanceError, match="does not match this site's key"):
        governance.record_charter_signature(fed, site_id, forged, now=12.0)
    assert fed.store.events("charter_signed") == []
    assert governance.ineligibility(fed, site_id) is not None


def test_plan_decisions_are_signed_recorded_and_shown(world):
    fed, site_id, key, record = world
    plan_hash = fed.add_plan(demo_plan(), now=5.0)
    fed.start_run(plan_hash, now=6.0)
    (item,) = governance.notice(fed, site_id).plans
    assert item["decision"] == "pending"
    _receive(record, governance.notice(fed, site_id))
    refusal = record.decide_plan(
        plan_hash, approve=False, reason="Ethics review pending", person="Dr. B", key=key, now=7
    )
    governance.record_plan_decision(fed, site_id, refusal, now=8.0)
    assert governance.notice(fed, site_id).plans[0]["decision"] == "refuse"
    assert fed.store.plan_decision(site_id, plan_hash)["reason"] == "Ethics review pending"
    approval = record.decide_plan(
        plan_hash, approve=True, reason="", person="Dr. B", key=key, now=9
    )
    governance.record_plan_decision(fed, site_id, approval, now=10.0)
    assert governance.notice(fed, site_id).plans[0]["decision"] == "approve"
    kinds = [e["kind"] for e in fed.store.events() if e["kind"].startswith("plan_")]
    assert kinds == ["plan_registered", "plan_refused", "plan_approved"]


def test_a_decision_on_an_unknown_plan_or_with_a_bad_signature_is_refused(world):
    fed, site_id, key, record = world
    plan_hash = fed.add_plan(demo_plan(), now=5.0)
    fed.start_run(plan_hash, now=6.0)
    _receive(record, governance.notice(fed, site_id))
    decision = record.decide_plan(plan_hash, approve=True, reason="", person="X", key=key, now=7)
    tampered = type(decision)(
        plan_hash=plan_hash, decision="approve", reason="", person="Y", signature=decision.signature
    )
    with pytest.raises(GovernanceError, match="does not match this site's key"):
        governance.record_plan_decision(fed, site_id, tampered, now=8.0)
    other = type(decision)(
        plan_hash="ab" * 32, decision="approve", reason="", person="X", signature="x"
    )
    with pytest.raises(GovernanceError, match="is not registered here"):
        governance.record_plan_decision(fed, site_id, other, now=8.0)


def test_validation_reports_are_checked_and_logged(tmp_path):
    built = build_finished_run(tmp_path / "coord")
    fed, run_id = built.fed, built.run_id
    site_id = built.site_ids[0]
    # the site keys of the builder are not kept; enrol a fresh site to report
    key = generate_signing_key()
    token = decode_invitation(fed.invite("Reporter", now=500.0)).token
    site = fed.store.redeem_invitation(token_digest(token), public_key_b64(key), 501.0)
    model = fed.store.run(run_id).model_digest
    metrics = {
        "auc": 0.91,
        "accuracy": 0.85,
        "sensitivity": 0.8,
        "specificity": 0.9,
        "loss": 0.3,
        "n": 40,
    }
    fields = signed.validation_fields(
        run_id=run_id, round=2, site_id=site.site_id, model=model, metrics=metrics
    )
    report = ValidationReport(
        run_id=run_id,
        round=2,
        model=model,
        metrics=metrics,
        signature=sign(key, signed.VALIDATION, fields),
    )
    governance.record_validation(fed, site.site_id, report, now=502.0)
    (row,) = [v for v in fed.store.validations(run_id) if v["site_id"] == site.site_id]
    assert row["metrics"]["auc"] == 0.91
    with pytest.raises(GovernanceError, match="does not match this site's key"):
        governance.record_validation(fed, site_id, report, now=503.0)
    wrong_model = ValidationReport(
        run_id=run_id, round=2, model="cd" * 32, metrics=metrics, signature=report.signature
    )
    with pytest.raises(GovernanceError, match="not one this run produced"):
        governance.record_validation(fed, site.site_id, wrong_model, now=503.0)
    fed.close()


def test_head_update_proves_consistency_and_the_sites_own_updates(tmp_path):
    built = build_finished_run(tmp_path / "coord")
    fed, run_id, site_id = built.fed, built.run_id, built.site_ids[0]
    heads = fed.store.ledger.heads()
    first = heads[0]
    update = governance.head_update(
        fed, site_id, HeadRequest(known_size=first.size, updates=[{"run_id": run_id, "round": 1}])
    )
    from shared.provenance.witness import Witness

    witness = Witness(fed.public_key())
    witness.observe(first, [])
    witness.observe(TreeHead.from_dict(update.head), [bytes.fromhex(h) for h in update.consistency])
    (inclusion,) = update.inclusions
    entry = LogEntry.from_dict(inclusion["entry"])
    assert entry.payload["site_id"] == site_id and entry.payload["round"] == 1
    witness.check_inclusion(entry, [bytes.fromhex(h) for h in inclusion["proof"]])
    fed.close()
