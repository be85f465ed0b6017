"""The site's own record of what it was asked to sign, what a person here decided, and what it
saw of the coordinator's log (SQLite, durable). Nothing here leaves the site except the signed
decisions themselves.

Theory of operation
-------------------
The coordinator tells the site (``GovernanceNotice``) which charter is current and which plans
are pending. Those offers are recorded after their coordinator signatures check out. A person
at the site then accepts the charter and approves or refuses each plan, from the app or the
command line; each decision is signed with the site key and kept here, and the participant
sends it. The participant trains only for a plan hash recorded here as approved, and only
while the site's policy allows (:mod:`shared.governance.policy`). The witness state (the tree
heads this site accepted) and every validation the site ran are kept too; together they are
the site's activity timeline.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.crypto.signing import sign, verify
from shared.errors import GovernanceError, SignatureError
from shared.governance.charter import charter_hash
from shared.governance.policy import SitePolicy
from shared.plan import TrainingPlan
from shared.protocol import signed
from shared.protocol.messages import CharterSignature, PlanDecision
from shared.provenance.witness import Witness
from shared.sqlite import open_database, transaction


@dataclass(frozen=True, slots=True)
class CharterOffer:
    version: int
    sha256: str
    text: str
    accepted_by: str | None
    accepted_at: float | None


@dataclass(frozen=True, slots=True)
class PlanRecord:
    plan_hash: str
    plan: TrainingPlan
    decision: str  # pending | approve | refuse
    reason: str
    person: str
    decided_at: float | None


class SiteGovernance:
    def __init__(self, path: Path, *, federation: str, site_id: str, coordinator_key: str):
        self.db = open_database(path, durable=True, what="site governance record")
        self.federation = federation
        self.site_id = site_id
        self.coordinator_key = coordinator_key
        with self._tx():
            self.db.table("charters").create(
                {
                    "version": int,
                    "sha256": str,
                    "text": str,
                    "coordinator_signature": str,
                    "received_at": float,
                    "accepted_by": str,
                    "accepted_at": float,
                    "signature": str,
                },
                pk="version",
                if_not_exists=True,
            )
            self.db.table("plans").create(
                {
                    "plan_hash": str,
                    "plan": str,
                    "plan_signature": str,
                    "received_at": float,
                    "decision": str,
                    "reason": str,
                    "person": str,
                    "signature": str,
                    "decided_at": float,
                },
                pk="plan_hash",
                if_not_exists=True,
            )
            self.db.table("activity").create(
                {"id": int, "at": float, "kind": str, "detail": str}, pk="id", if_not_exists=True
            )
            self.db.table("state").create({"key": str, "value": str}, pk="key", if_not_exists=True)

    def close(self) -> None:
        self.db.conn.close()

    @contextmanager
    def _tx(self) -> Iterator[None]:
        with transaction(self.db, "site governance record"):
            yield

    def _note(self, kind: str, at: float, **detail: Any) -> None:
        self.db.table("activity").insert({"at": at, "kind": kind, "detail": json.dumps(detail)})

    def activity(self) -> list[dict[str, Any]]:
        """Everything this site was offered, decided, signed, checked and reported, in order."""
        return [
            {**r, "detail": json.loads(r["detail"])}
            for r in self.db.table("activity").rows_where(order_by="id")
        ]

    # -- charter -------------------------------------------------------------------------

    def record_charter(
        self, version: int, sha256: str, text: str, coordinator_signature: str, now: float
    ) -> None:
        """Keep an offered charter version once its hash and the coordinator's signature hold."""
        if charter_hash(text) != sha256:
            raise GovernanceError(
                f"the text of charter version {version} does not match its hash",
                code="governance.charter_mismatch",
            )
        try:
            verify(
                self.coordinator_key,
                signed.CHARTER,
                signed.charter_fields(federation=self.federation, version=version, sha256=sha256),
                coordinator_signature,
            )
        except SignatureError as exc:
            raise GovernanceError(
                f"charter version {version} is not signed by this federation's coordinator",
                code="governance.bad_signature",
            ) from exc
        if self.charter(version) is not None:
            return
        with self._tx():
            self.db.table("charters").insert(
                {
                    "version": version,
                    "sha256": sha256,
                    "text": text,
                    "coordinator_signature": coordinator_signature,
                    "received_at": now,
                    "accepted_by": None,
                    "accepted_at": None,
                    "signature": None,
                }
            )
            self._note("charter_offered", now, version=version, sha256=sha256)

    def charter(self, version: int | None = None) -> CharterOffer | None:
        table = self.db.table("charters")
        rows = (
            list(table.rows_where(order_by="version desc", limit=1))
            if version is None
            else list(table.rows_where("version = ?", [version]))
        )
        if not rows:
            return None
        r = rows[0]
        return CharterOffer(
            r["version"], r["sha256"], r["text"], r["accepted_by"], r["accepted_at"]
        )

    def accept_charter(
        self, version: int, person: str, key: Ed25519PrivateKey, now: float
    ) -> CharterSignature:
        """A person here accepts charter ``version``: sign it, record it, return the message."""
        offer = self.charter(version)
        if offer is None:
            raise GovernanceError(
                f"charter version {version} has not been received from the coordinator yet; "
                "connect once so it can be shown here",
                code="governance.unknown_charter",
            )
        person = _person(person)
        fields = signed.charter_accept_fields(
            federation=self.federation,
            site_id=self.site_id,
            version=version,
            sha256=offer.sha256,
            person=person,
        )
        signature = sign(key, signed.CHARTER_ACCEPT, fields)
        with self._tx():
            self.db.table("charters").update(
                version, {"accepted_by": person, "accepted_at": now, "signature": signature}
            )
            self._note("charter_accepted", now, version=version, sha256=offer.sha256, person=person)
        return self.charter_signature(version)  # type: ignore[return-value]

    def charter_signature(self, version: int) -> CharterSignature | None:
        rows = list(self.db.table("charters").rows_where("version = ?", [version]))
        if not rows or not rows[0]["signature"]:
            return None
        r = rows[0]
        return CharterSignature(
            version=version, sha256=r["sha256"], person=r["accepted_by"], signature=r["signature"]
        )

    # -- plans ---------------------------------------------------------------------------

    def record_plan(
        self, plan_hash: str, plan: dict[str, Any], plan_signature: str, now: float
    ) -> TrainingPlan:
        """Keep an offered plan once it parses here, hashes right and carries the coordinator's
        signature. A plan this installation cannot run raises ``PlanError`` saying why."""
        parsed = TrainingPlan.from_dict(plan)
        if parsed.plan_hash != plan_hash:
            raise GovernanceError(
                "the plan offered does not match its hash", code="governance.plan_mismatch"
            )
        try:
            verify(
                self.coordinator_key,
                signed.PLAN,
                signed.plan_fields(plan_hash=plan_hash),
                plan_signature,
            )
        except SignatureError as exc:
            raise GovernanceError(
                "the plan is not signed by this federation's coordinator",
                code="governance.bad_signature",
            ) from exc
        if self.plan(plan_hash) is None:
            with self._tx():
                self.db.table("plans").insert(
                    {
                        "plan_hash": plan_hash,
                        "plan": parsed.canonical_json().decode("utf-8"),
                        "plan_signature": plan_signature,
                        "received_at": now,
                        "decision": "pending",
                        "reason": "",
                        "person": "",
                        "signature": None,
                        "decided_at": None,
                    }
                )
                self._note("plan_offered", now, plan_hash=plan_hash, name=parsed.name)
        return parsed

    def plan(self, plan_hash: str) -> PlanRecord | None:
        rows = list(self.db.table("plans").rows_where("plan_hash = ?", [plan_hash]))
        return _plan_record(rows[0]) if rows else None

    def plans(self) -> list[PlanRecord]:
        return [_plan_record(r) for r in self.db.table("plans").rows_where(order_by="received_at")]

    def decide_plan(
        self,
        plan_hash: str,
        *,
        approve: bool,
        reason: str,
        person: str,
        key: Ed25519PrivateKey,
        now: float,
    ) -> PlanDecision:
        """A person here approves or refuses a plan (a refusal needs a reason); signed."""
        if self.plan(plan_hash) is None:
            raise GovernanceError(
                f"plan {plan_hash[:12]} has not been received from the coordinator",
                code="governance.unknown_plan",
            )
        decision = "approve" if approve else "refuse"
        reason = reason.strip()
        if not approve and not reason:
            raise GovernanceError(
                "say why the plan is refused; the reason is sent to the consortium lead",
                code="governance.reason_required",
            )
        person = _person(person)
        fields = signed.plan_decision_fields(
            federation=self.federation,
            site_id=self.site_id,
            plan_hash=plan_hash,
            decision=decision,
            reason=reason,
            person=person,
        )
        signature = sign(key, signed.PLAN_DECISION, fields)
        with self._tx():
            self.db.table("plans").update(
                plan_hash,
                {
                    "decision": decision,
                    "reason": reason,
                    "person": person,
                    "signature": signature,
                    "decided_at": now,
                },
            )
            self._note(
                "plan_approved" if approve else "plan_refused",
                now,
                plan_hash=plan_hash,
                reason=reason,
                person=person,
            )
        return PlanDecision(
            plan_hash=plan_hash,
            decision=decision,
            reason=reason,
            person=person,
            signature=signature,
        )

    def plan_decision(self, plan_hash: str) -> PlanDecision | None:
        rows = list(self.db.table("plans").rows_where("plan_hash = ?", [plan_hash]))
        if not rows or not rows[0]["signature"]:
            return None
        r = rows[0]
        return PlanDecision(
            plan_hash=plan_hash,
            decision=r["decision"],
            reason=r["reason"],
            person=r["person"],
            signature=r["signature"],
        )

    def approved(self, plan_hash: str) -> bool:
        record = self.plan(plan_hash)
        return record is not None and record.decision == "approve"

    # -- policy, witness, validations ----------------------------------------------------

    def _state(self, key: str) -> str | None:
        rows = list(self.db.table("state").rows_where("key = ?", [key]))
        return rows[0]["value"] if rows else None

    def _set_state(self, key: str, value: str) -> None:
        self.db.table("state").upsert({"key": key, "value": value}, pk="key")

    def policy(self) -> SitePolicy:
        raw = self._state("policy")
        return SitePolicy.from_dict(json.loads(raw)) if raw else SitePolicy()

    def set_policy(self, policy: SitePolicy, now: float) -> None:
        with self._tx():
            self._set_state("policy", json.dumps(policy.to_dict()))
            self._note("policy_changed", now, **policy.to_dict())

    def witness(self) -> Witness:
        raw = self._state("witness")
        if raw is None:
            return Witness(self.coordinator_key)
        return Witness.from_dict(json.loads(raw), coordinator_public_key=self.coordinator_key)

    def save_witness(self, witness: Witness, now: float) -> None:
        head = witness.head
        with self._tx():
            self._set_state("witness", json.dumps(witness.to_dict()))
            if head is not None:
                self._note("tree_head_checked", now, size=head.size, root=head.root)

    def note(self, kind: str, now: float, **detail: Any) -> None:
        """Record something this site did (validation reported, contribution verified...)."""
        with self._tx():
            self._note(kind, now, **detail)


def _person(person: str) -> str:
    person = " ".join(person.split())
    if not 0 < len(person) <= 200:
        raise GovernanceError(
            "give the name of the person deciding (1-200 characters)",
            code="governance.person_required",
        )
    return person


def _plan_record(r: dict[str, Any]) -> PlanRecord:
    return PlanRecord(
        plan_hash=r["plan_hash"],
        plan=TrainingPlan.from_dict(json.loads(r["plan"])),
        decision=r["decision"],
        reason=r["reason"],
        person=r["person"],
        decided_at=r["decided_at"],
    )
