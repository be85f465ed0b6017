"""The participant's governance duties against a real coordinator store (no network)."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from coordinator import governance
from coordinator.store import Store, UpdateRecord
from shared.crypto.signing import sign
from shared.governance.policy import SitePolicy
from shared.plan import demo_plan
from shared.protocol import signed
from shared.protocol.messages import (
    CharterSignature,
    PlanDecision,
    TransferOffer,
    UpdateOffer,
)
from shared.provenance.errors import ProvenanceError
from site_client.core.governance_link import POLICY_PERSON

CHARTER = (
    "# Terms\n\n## Data use\nx\n## Ownership\nx\n## Validation\nx\n## Contributions\nx\n"
    "## Disputes\nx\n## Publication and authorship\nx\n"
)


def _deliver(fed, site_id, messages, now=20.0):
    for msg in messages:
        if isinstance(msg, CharterSignature):
            governance.record_charter_signature(fed, site_id, msg, now)
        elif isinstance(msg, PlanDecision):
            governance.record_plan_decision(fed, site_id, msg, now)


def test_charter_accepted_at_the_site_reaches_the_coordinator(world):
    fed, site_id, link = world
    fed.publish_charter(CHARTER.encode(), now=5.0)
    assert link.on_notice(governance.notice(fed, site_id), now=6.0) == []  # nobody accepted yet
    assert governance.ineligibility(fed, site_id) is not None
    link.record.accept_charter(1, "Dr. East", link.key, now=7.0)
    messages = link.on_notice(governance.notice(fed, site_id), now=8.0)
    assert [type(m) for m in messages] == [CharterSignature]
    _deliver(fed, site_id, messages)
    assert governance.ineligibility(fed, site_id) is None
    assert link.on_notice(governance.notice(fed, site_id), now=9.0) == []  # nothing more to send


def test_never_trains_for_a_plan_not_approved_here(world):
    fed, site_id, link = world
    plan_hash = fed.add_plan(demo_plan(), now=5.0)
    fed.start_run(plan_hash, now=6.0)
    link.on_notice(governance.notice(fed, site_id), now=7.0)
    now = time.time()
    assert link.refusal(plan_hash, now)[0] == "governance.plan_not_approved"
    assert link.refusal("ab" * 32, now)[0] == "governance.plan_not_approved"
    link.record.decide_plan(
        plan_hash, approve=False, reason="not now", person="Dr. East", key=link.key, now=8.0
    )
    code, reason = link.refusal(plan_hash, now)
    assert code == "governance.plan_refused" and "not now" in reason
    link.record.decide_plan(
        plan_hash, approve=True, reason="", person="Dr. East", key=link.key, now=9.0
    )
    assert link.refusal(plan_hash, now) is None
    messages = link.on_notice(governance.notice(fed, site_id), now=10.0)
    _deliver(fed, site_id, messages)
    assert fed.store.plan_decision(site_id, plan_hash)["decision"] == "approve"


def test_a_plan_below_the_policy_is_refused_with_the_reason(world):
    fed, site_id, link = world
    link.record.set_policy(SitePolicy(max_epsilon=2.0), now=4.0)
    plan_hash = fed.add_plan(demo_plan(), now=5.0)
    fed.start_run(plan_hash, now=6.0)
    messages = link.on_notice(governance.notice(fed, site_id), now=7.0)
    (refusal,) = messages
    assert refusal.decision == "refuse" and refusal.person == POLICY_PERSON
    assert "requires differential privacy" in refusal.reason
    _deliver(fed, site_id, messages)
    row = fed.store.plan_decision(site_id, plan_hash)
    assert row["decision"] == "refuse" and "epsilon 2" in row["reason"]
    assert link.refusal(plan_hash, time.time())[0] == "governance.plan_refused"


def test_outside_training_hours_the_site_declines(world):
    fed, site_id, link = world
    plan_hash = fed.add_plan(demo_plan(), now=5.0)
    fed.start_run(plan_hash, now=6.0)
    link.on_notice(governance.notice(fed, site_id), now=7.0)
    link.record.decide_plan(plan_hash, approve=True, reason="", person="A", key=link.key, now=8)
    noon = time.mktime((2026, 11, 27, 12, 0, 0, 0, 0, -1))
    link.record.set_policy(SitePolicy(training_hours="19:00-07:00"), now=9.0)
    assert link.refusal(plan_hash, noon)[0] == "governance.outside_hours"
    assert link.refusal(plan_hash, noon + 10 * 3600) is None  # 22:00


def _contribute(fed, site_id, link, run, rnd, now):
    digest = hashlib.sha256(f"update {rnd}".encode()).hexdigest()
    fields = signed.update_fields(
        run_id=run.run_id,
        round=rnd,
        site_id=site_id,
        plan_hash=run.plan_hash,
        base_model=run.model_digest,
        sha256=digest,
        num_samples=10,
    )
    signature = sign(link.key, signed.UPDATE, fields)
    fed.store.open_round(run.run_id, rnd, [site_id], run.model_digest, now, now + 60)
    fed.store.add_update(
        UpdateRecord(run.run_id, rnd, site_id, digest, 10, 0.5, now + 1), signature
    )
    offer = TransferOffer(transfer_id="u-" + digest, size=1, sha256=digest, chunk_size=1)
    link.contributed(
        UpdateOffer(
            run_id=run.run_id,
            round=rnd,
            base_model=run.model_digest,
            update=offer.body(),
            num_samples=10,
            train_loss=0.5,
            signature=signature,
        ),
        now + 2,
    )
    fed.store.commit_round(run.run_id, rnd, run.model_digest, 1, 0.5, False, now + 3)


def test_the_site_proves_its_updates_and_catches_a_rewritten_history(world, tmp_path):
    fed, site_id, link = world
    plan_hash = fed.add_plan(demo_plan(), now=5.0)
    run = fed.start_run(plan_hash, now=6.0)
    _contribute(fed, site_id, link, run, 1, now=10.0)
    request = link.head_request()
    assert request.known_size == 0 and request.updates == [{"run_id": run.run_id, "round": 1}]
    assert link.on_head_update(governance.head_update(fed, site_id, request), now=20.0) == 1
    assert link.head_request().updates == []  # proven, not asked again
    _contribute(fed, site_id, link, run, 2, now=30.0)
    assert link.on_head_update(governance.head_update(fed, site_id, link.head_request()), 40) == 1

    # The coordinator rewrites an earlier entry (a site's sample count) and signs on.
    fed.store.db.execute(
        "UPDATE events SET detail = ? WHERE kind = 'update_received' AND id = "
        "(SELECT min(id) FROM events WHERE kind = 'update_received')",
        [json.dumps({"rewritten": True}, separators=(",", ":"))],
    )
    fed.store.db.conn.commit()
    rewritten = Store(fed.paths.database, head_key=fed.signing_key())
    rewritten.log("round_closed", 50.0, note="after the rewrite")
    rewritten.ledger.sign_head(fed.signing_key(), 51.0, reason="rewritten")
    fed.store.ledger.forget()
    with pytest.raises(ProvenanceError, match="record of history changed") as info:
        link.on_head_update(governance.head_update(fed, site_id, link.head_request()), 60.0)
    assert info.value.code == "provenance.rewritten"
    rewritten.close()


def test_answers_to_requests_from_an_older_head_are_not_taken_for_a_rewrite(world):
    """A site sends a head request on connecting and another when a run ends: both name the
    head it held then, and their answers arrive after it moved on."""
    fed, site_id, link = world
    run = fed.start_run(fed.add_plan(demo_plan(), now=5.0), now=6.0)
    _contribute(fed, site_id, link, run, 1, now=10.0)
    first, second = link.head_request(), link.head_request()
    assert link.on_head_update(governance.head_update(fed, site_id, first), now=20.0) == 1
    # the same tree again, with a proof from the old size: accepted as it is
    assert link.on_head_update(governance.head_update(fed, site_id, second), now=21.0) == 0
    _contribute(fed, site_id, link, run, 2, now=30.0)
    # a newer head with a proof from the old size cannot be checked: ask again
    late = governance.head_update(fed, site_id, second)
    assert late.known_size == 0 and link.on_head_update(late, now=40.0) is None
    assert link.on_head_update(governance.head_update(fed, site_id, link.head_request()), 41) == 1
