"""What sites sign and the coordinator proves: charter signatures, plan decisions, validation
reports, and the tree heads with proofs that let sites audit the log. No I/O beyond the store.

The server hands each governance message here with the authenticated site id; every signature
is checked against the key the site enrolled with before anything is stored, so what the log
records as "site X approved plan P" carries X's own signature and an auditor can check it
offline (:mod:`shared.provenance.bundle`).
"""

from __future__ import annotations

from typing import Any

from coordinator.federation import Federation
from shared.crypto.signing import verify
from shared.errors import GovernanceError, SignatureError
from shared.protocol import signed
from shared.protocol.messages import (
    CharterSignature,
    Dispute,
    GovernanceNotice,
    HeadRequest,
    HeadUpdate,
    PlanDecision,
    ValidationReport,
)

MAX_PROOFS = 256


def _site_key(fed: Federation, site_id: str) -> str:
    site = fed.store.site(site_id)
    if site is None:
        raise GovernanceError(f"unknown site {site_id}", code="governance.unknown_site")
    return site.public_key


def _check(fed: Federation, site_id: str, purpose: str, fields: dict, signature: str) -> None:
    try:
        verify(_site_key(fed, site_id), purpose, fields, signature)
    except SignatureError as exc:
        raise GovernanceError(
            "the signature does not match this site's key; nothing was recorded",
            code="governance.bad_signature",
        ) from exc


def ineligibility(fed: Federation, site_id: str) -> str | None:
    """Why ``site_id`` may not be selected for a round now (``None``: it may)."""
    charter = fed.store.charter()
    if charter is not None and not fed.store.charter_signed(site_id, charter.version):
        return f"has not signed charter version {charter.version}"
    return None


def notice(fed: Federation, site_id: str) -> GovernanceNotice:
    """The charter and the plans of pending or running runs, as this site should see them."""
    charter = fed.store.charter()
    signed_current = charter is not None and fed.store.charter_signed(site_id, charter.version)
    plans = []
    seen: set[str] = set()
    for run in fed.store.runs():
        if run.status != "running" or run.plan_hash in seen:
            continue
        seen.add(run.plan_hash)
        row = fed.store.plan(run.plan_hash)
        if row is None:
            continue
        decision = fed.store.plan_decision(site_id, run.plan_hash)
        plans.append(
            {
                "plan": fed.plan(run.plan_hash).to_dict(),
                "plan_hash": run.plan_hash,
                "plan_signature": row["signature"],
                "decision": decision["decision"] if decision else "pending",
            }
        )
    return GovernanceNotice(
        charter_version=charter.version if charter else 0,
        charter_sha256=charter.sha256 if charter else "",
        charter_signature=charter.signature if charter else "",
        charter_text="" if (charter is None or signed_current) else charter.text,
        charter_signed=signed_current,
        plans=plans,
    )


def record_charter_signature(
    fed: Federation, site_id: str, msg: CharterSignature, now: float
) -> None:
    charter = fed.store.charter(msg.version)
    if charter is None or charter.sha256 != msg.sha256:
        raise GovernanceError(
            f"charter version {msg.version} with that hash was never published here",
            code="governance.unknown_charter",
        )
    fields = signed.charter_accept_fields(
        federation=fed.config.federation,
        site_id=site_id,
        version=msg.version,
        sha256=msg.sha256,
        person=msg.person,
    )
    _check(fed, site_id, signed.CHARTER_ACCEPT, fields, msg.signature)
    fed.store.record_charter_signature(
        site_id, msg.version, msg.sha256, msg.person, msg.signature, now
    )


def record_plan_decision(fed: Federation, site_id: str, msg: PlanDecision, now: float) -> None:
    if fed.store.plan(msg.plan_hash) is None:
        raise GovernanceError(
            f"plan {msg.plan_hash[:12]} is not registered here", code="governance.unknown_plan"
        )
    fields = signed.plan_decision_fields(
        federation=fed.config.federation,
        site_id=site_id,
        plan_hash=msg.plan_hash,
        decision=msg.decision,
        reason=msg.reason,
        person=msg.person,
    )
    _check(fed, site_id, signed.PLAN_DECISION, fields, msg.signature)
    fed.store.record_plan_decision(
        site_id, msg.plan_hash, msg.decision, msg.reason, msg.person, msg.signature, now
    )


def record_validation(fed: Federation, site_id: str, msg: ValidationReport, now: float) -> None:
    run = fed.store.run(msg.run_id)
    if run is None:
        raise GovernanceError(f"unknown run {msg.run_id}", code="governance.unknown_run")
    known = {r["model_out"] for r in fed.store.rounds(msg.run_id) if r["model_out"]}
    first = fed.store.rounds(msg.run_id)[:1]
    if first and first[0]["model_in"]:
        known.add(first[0]["model_in"])
    if msg.model not in known:
        raise GovernanceError(
            "the validated model is not one this run produced", code="governance.unknown_model"
        )
    fields = signed.validation_fields(
        run_id=msg.run_id, round=msg.round, site_id=site_id, model=msg.model, metrics=msg.metrics
    )
    _check(fed, site_id, signed.VALIDATION, fields, msg.signature)
    fed.store.record_validation(
        msg.run_id, msg.round, site_id, msg.model, dict(msg.metrics), msg.signature, now
    )


def head_update(fed: Federation, site_id: str, request: HeadRequest) -> HeadUpdate | None:
    """The latest signed head, a consistency proof from the site's last one and inclusion
    proofs of the site's own updates (``None`` if no head was signed yet)."""
    ledger = fed.store.ledger
    head = ledger.latest_head()
    if head is None:
        return None
    log = ledger.log()
    known = min(request.known_size, head.size)
    consistency = log.consistency(known, head.size) if 0 < known < head.size else []
    wanted = {(u["run_id"], u["round"]) for u in request.updates[:MAX_PROOFS]}
    inclusions = []
    for entry in log.entries[: head.size]:
        p = entry.payload
        if (
            entry.kind == "update_received"
            and p.get("site_id") == site_id
            and (p.get("run_id"), p.get("round")) in wanted
        ):
            proof = log.inclusion(entry.index, head.size)
            inclusions.append({"entry": entry.to_dict(), "proof": [h.hex() for h in proof]})
    return HeadUpdate(
        head=head.to_dict(),
        known_size=known,
        consistency=[h.hex() for h in consistency],
        inclusions=inclusions,
    )


def record_dispute(fed: Federation, site_id: str, msg: Dispute, now: float) -> bool:
    """Record a site's signed dispute (once; a resend after a reconnect changes nothing)."""
    if fed.store.run(msg.run_id) is None:
        raise GovernanceError(f"unknown run {msg.run_id}", code="governance.unknown_run")
    body: dict[str, Any] = {
        "dispute_id": msg.dispute_id,
        "subject": msg.subject,
        "run_id": msg.run_id,
        "round": msg.round,
        "release": msg.release,
        "reason": msg.reason,
        "person": msg.person,
    }
    fields = signed.dispute_fields(federation=fed.config.federation, site_id=site_id, **body)
    _check(fed, site_id, signed.DISPUTE, fields, msg.signature)
    existing = fed.store.dispute(msg.dispute_id)
    if existing is not None and existing["site_id"] != site_id:
        raise GovernanceError(
            "another site already used this dispute id", code="governance.dispute_id"
        )
    return fed.store.record_dispute(site_id, {**body, "signature": msg.signature}, now)
