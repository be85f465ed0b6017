"""The governance half of the coordinator's database: the charter versions, what each site
signed (charter acceptances, plan decisions) and the validations sites reported.

A mixin of :class:`coordinator.store.Store`, over the same connection and transactions, so
every record and its provenance entry commit together.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlite_utils

from shared.errors import GovernanceError


@dataclass(frozen=True, slots=True)
class CharterRecord:
    version: int
    sha256: str
    text: str
    signature: str
    published_at: float


class GovernanceRecords:
    """Needs ``_t``, ``transaction`` and ``log`` from the store it is mixed into."""

    if TYPE_CHECKING:  # provided by Store

        def _t(self, name: str) -> sqlite_utils.db.Table: ...

        def transaction(self) -> AbstractContextManager[None]: ...

        def log(self, kind: str, now: float, **detail: Any) -> None: ...

    def _create_governance_tables(self) -> None:
        self._t("disputes").create(
            {
                "dispute_id": str,
                "site_id": str,
                "subject": str,
                "run_id": str,
                "round": int,
                "release": str,
                "reason": str,
                "person": str,
                "signature": str,
                "raised_at": float,
                "resolution": str,
                "resolved_at": float,
            },
            pk="dispute_id",
            if_not_exists=True,
        )
        self._t("charters").create(
            {
                "version": int,
                "sha256": str,
                "text": str,
                "signature": str,
                "published_at": float,
            },
            pk="version",
            if_not_exists=True,
        )
        self._t("charter_signatures").create(
            {
                "site_id": str,
                "version": int,
                "sha256": str,
                "person": str,
                "signature": str,
                "signed_at": float,
            },
            pk=("site_id", "version"),
            if_not_exists=True,
        )
        self._t("plan_decisions").create(
            {
                "site_id": str,
                "plan_hash": str,
                "decision": str,
                "reason": str,
                "person": str,
                "signature": str,
                "decided_at": float,
            },
            pk=("site_id", "plan_hash"),
            if_not_exists=True,
        )
        self._t("validations").create(
            {
                "run_id": str,
                "round": int,
                "site_id": str,
                "model": str,
                "metrics": str,
                "signature": str,
                "received_at": float,
            },
            pk=("run_id", "round", "site_id"),
            if_not_exists=True,
        )

    # -- charter -------------------------------------------------------------------------

    def publish_charter(self, version: int, text: str, sha256: str, signature: str, now: float):
        """Store charter ``version`` (it must be the next one) and log its hash."""
        with self.transaction():
            current = self.charter()
            expected = (current.version if current else 0) + 1
            if version != expected:
                raise GovernanceError(
                    f"charter version {version} cannot follow version {expected - 1}; publish "
                    "again",
                    code="governance.charter_version",
                )
            self._t("charters").insert(
                {
                    "version": version,
                    "sha256": sha256,
                    "text": text,
                    "signature": signature,
                    "published_at": now,
                }
            )
            self.log("charter_published", now, version=version, sha256=sha256, signature=signature)

    def charter(self, version: int | None = None) -> CharterRecord | None:
        """Charter ``version``, or the current (latest) one; ``None`` if none was published."""
        if version is None:
            rows = list(self._t("charters").rows_where(order_by="version desc", limit=1))
        else:
            rows = list(self._t("charters").rows_where("version = ?", [version]))
        return CharterRecord(**rows[0]) if rows else None

    def charters(self) -> list[CharterRecord]:
        return [CharterRecord(**r) for r in self._t("charters").rows_where(order_by="version")]

    # -- what sites signed ---------------------------------------------------------------

    def record_charter_signature(
        self, site_id: str, version: int, sha256: str, person: str, signature: str, now: float
    ) -> None:
        with self.transaction():
            self._t("charter_signatures").upsert(
                {
                    "site_id": site_id,
                    "version": version,
                    "sha256": sha256,
                    "person": person,
                    "signature": signature,
                    "signed_at": now,
                },
                pk=("site_id", "version"),
            )
            self.log(
                "charter_signed",
                now,
                site_id=site_id,
                version=version,
                sha256=sha256,
                person=person,
                signature=signature,
            )

    def charter_signed(self, site_id: str, version: int) -> bool:
        rows = self._t("charter_signatures").rows_where(
            "site_id = ? and version = ?", [site_id, version]
        )
        return any(True for _ in rows)

    def record_plan_decision(
        self,
        site_id: str,
        plan_hash: str,
        decision: str,
        reason: str,
        person: str,
        signature: str,
        now: float,
    ) -> None:
        """A site's latest decision on a plan (it may change its mind; the log keeps each)."""
        with self.transaction():
            self._t("plan_decisions").upsert(
                {
                    "site_id": site_id,
                    "plan_hash": plan_hash,
                    "decision": decision,
                    "reason": reason,
                    "person": person,
                    "signature": signature,
                    "decided_at": now,
                },
                pk=("site_id", "plan_hash"),
            )
            self.log(
                "plan_approved" if decision == "approve" else "plan_refused",
                now,
                site_id=site_id,
                plan_hash=plan_hash,
                decision=decision,
                reason=reason,
                person=person,
                signature=signature,
            )

    def plan_decision(self, site_id: str, plan_hash: str) -> dict[str, Any] | None:
        rows = list(
            self._t("plan_decisions").rows_where(
                "site_id = ? and plan_hash = ?", [site_id, plan_hash]
            )
        )
        return dict(rows[0]) if rows else None

    def plan_decisions(self, plan_hash: str) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self._t("plan_decisions").rows_where(
                "plan_hash = ?", [plan_hash], order_by="site_id"
            )
        ]

    def record_validation(
        self,
        run_id: str,
        rnd: int,
        site_id: str,
        model: str,
        metrics: dict[str, Any],
        signature: str,
        now: float,
    ) -> None:
        with self.transaction():
            self._t("validations").upsert(
                {
                    "run_id": run_id,
                    "round": rnd,
                    "site_id": site_id,
                    "model": model,
                    "metrics": json.dumps(metrics),
                    "signature": signature,
                    "received_at": now,
                },
                pk=("run_id", "round", "site_id"),
            )
            self.log(
                "validation_reported",
                now,
                run_id=run_id,
                round=rnd,
                site_id=site_id,
                model=model,
                metrics=metrics,
                signature=signature,
            )

    def validations(self, run_id: str) -> list[dict[str, Any]]:
        return [
            {**r, "metrics": json.loads(r["metrics"])}
            for r in self._t("validations").rows_where(
                "run_id = ?", [run_id], order_by="round, site_id"
            )
        ]

    # -- disputes -------------------------------------------------------------------------

    def record_dispute(self, site_id: str, dispute: dict[str, Any], now: float) -> bool:
        """Keep a site's signed dispute; ``False`` if it was already recorded (a resend)."""
        with self.transaction():
            if self.dispute(dispute["dispute_id"]) is not None:
                return False
            self._t("disputes").insert(
                {
                    **dispute,
                    "site_id": site_id,
                    "raised_at": now,
                    "resolution": None,
                    "resolved_at": None,
                }
            )
            self.log("dispute_raised", now, site_id=site_id, **dispute)
        return True

    def resolve_dispute(self, dispute_id: str, resolution: str, now: float) -> None:
        with self.transaction():
            row = self.dispute(dispute_id)
            if row is None:
                raise GovernanceError(
                    f"no dispute {dispute_id!r}; 'tessera-coordinator dispute list' shows them",
                    code="governance.unknown_dispute",
                )
            if row["resolved_at"] is not None:
                raise GovernanceError(
                    f"dispute {dispute_id} was already resolved", code="governance.resolved"
                )
            self._t("disputes").update(dispute_id, {"resolution": resolution, "resolved_at": now})
            self.log(
                "dispute_resolved",
                now,
                dispute_id=dispute_id,
                site_id=row["site_id"],
                run_id=row["run_id"],
                resolution=resolution,
            )

    def dispute(self, dispute_id: str) -> dict[str, Any] | None:
        rows = list(self._t("disputes").rows_where("dispute_id = ?", [dispute_id]))
        return dict(rows[0]) if rows else None

    def disputes(self, *, open_only: bool = False) -> list[dict[str, Any]]:
        where = "resolved_at IS NULL" if open_only else None
        return [dict(r) for r in self._t("disputes").rows_where(where, order_by="raised_at")]
