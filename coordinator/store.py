"""Federation state in one SQLite database (sqlite-utils), durable before acknowledging.

WAL journal with ``synchronous=FULL``: a committed transaction survives a crash, which is
what lets a coordinator killed at any moment restart and carry the run on. The round engine
never touches this module; the server adapter persists what the engine decides.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.ledger import Ledger
from coordinator.store_governance import GovernanceRecords
from shared.errors import InvitationError
from shared.sqlite import open_database, transaction

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class SiteRecord:
    site_id: str
    name: str
    public_key: str
    enrolled_at: float


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_id: str
    plan_hash: str
    status: str  # running | finished | failed
    current_round: int
    model_digest: str
    created_at: float


@dataclass(frozen=True, slots=True)
class UpdateRecord:
    run_id: str
    round: int
    site_id: str
    digest: str
    num_samples: int
    train_loss: float
    received_at: float


class Store(GovernanceRecords):
    """``head_key``: the coordinator's signing key; with it, every closed round gets a signed
    tree head over the provenance log (see :mod:`coordinator.ledger`)."""

    def __init__(self, path: Path, head_key: Ed25519PrivateKey | None = None) -> None:
        self.path = path
        self.db = open_database(path, durable=True, what="federation database")
        self.ledger = Ledger(self.db)
        self.head_key = head_key
        self._migrate()

    def _t(self, name: str) -> sqlite_utils.db.Table:
        return self.db.table(name)

    def close(self) -> None:
        self.db.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Durable: committed (and synced) before the caller acknowledges anything."""
        try:
            with transaction(self.db, "federation database"):
                yield
        except BaseException:
            self.ledger.forget()  # it may have seen entries that were rolled back
            raise

    def _migrate(self) -> None:
        with self.transaction():
            self._t("meta").create({"key": str, "value": str}, pk="key", if_not_exists=True)
            self._t("invitations").create(
                {
                    "token_digest": str,
                    "site_name": str,
                    "created_at": float,
                    "expires_at": float,
                    "used_at": float,
                    "site_id": str,
                },
                pk="token_digest",
                if_not_exists=True,
            )
            self._t("sites").create(
                {"site_id": str, "name": str, "public_key": str, "enrolled_at": float},
                pk="site_id",
                if_not_exists=True,
            )
            self._t("plans").create(
                {"plan_hash": str, "name": str, "json": str, "signature": str, "added_at": float},
                pk="plan_hash",
                if_not_exists=True,
            )
            self._t("runs").create(
                {
                    "run_id": str,
                    "plan_hash": str,
                    "status": str,
                    "current_round": int,
                    "model_digest": str,
                    "created_at": float,
                    "finished_at": float,
                },
                pk="run_id",
                if_not_exists=True,
            )
            self._t("rounds").create(
                {
                    "run_id": str,
                    "round": int,
                    "attempt": int,
                    "status": str,
                    "opened_at": float,
                    "deadline_at": float,
                    "selected": str,
                    "closed_at": float,
                    "model_in": str,
                    "model_out": str,
                    "n_updates": int,
                    "mean_loss": float,
                    "opt_state": str,
                },
                pk=("run_id", "round"),
                if_not_exists=True,
            )
            # Added with the server optimisers: the digest of the optimiser state blob after
            # the round (NULL for other strategies). Databases made before lack the column.
            if "opt_state" not in self._t("rounds").columns_dict:
                self.db.execute("ALTER TABLE rounds ADD COLUMN opt_state TEXT")
            self._t("updates").create(
                {
                    "run_id": str,
                    "round": int,
                    "site_id": str,
                    "digest": str,
                    "num_samples": int,
                    "train_loss": float,
                    "signature": str,
                    "received_at": float,
                },
                pk=("run_id", "round", "site_id"),
                if_not_exists=True,
            )
            self._t("rejections").create(
                {
                    "id": int,
                    "run_id": str,
                    "round": int,
                    "site_id": str,
                    "code": str,
                    "reason": str,
                    "at": float,
                },
                pk="id",
                if_not_exists=True,
            )
            self._t("site_summaries").create(
                {"site_id": str, "summary": str, "received_at": float},
                pk="site_id",
                if_not_exists=True,
            )
            self.ledger.create_tables()
            self._create_governance_tables()
            self._t("meta").upsert(
                {"key": "schema_version", "value": str(SCHEMA_VERSION)}, pk="key"
            )

    # -- meta & log ----------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        try:
            return str(self._t("meta").get(key)["value"])
        except sqlite_utils.db.NotFoundError:
            return default

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self._t("meta").upsert({"key": key, "value": value}, pk="key")

    def log(self, kind: str, now: float, **detail: Any) -> None:
        """Append to the provenance log. Callers already inside a transaction stay in it."""
        self.ledger.append(kind, now, detail)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        where, args = ("kind = ?", [kind]) if kind else (None, None)
        return [
            {**row, "detail": json.loads(row["detail"])}
            for row in self._t("events").rows_where(where, args, order_by="id")
        ]

    # -- invitations and sites -----------------------------------------------------------

    def add_invitation(self, token_digest: str, site_name: str, now: float, expires_at: float):
        with self.transaction():
            self._t("invitations").insert(
                {
                    "token_digest": token_digest,
                    "site_name": site_name,
                    "created_at": now,
                    "expires_at": expires_at,
                    "used_at": None,
                    "site_id": None,
                }
            )
            self.log("site_invited", now, site_name=site_name)

    def redeem_invitation(self, token_digest: str, public_key: str, now: float) -> SiteRecord:
        """Single use: the token row is marked used in the same transaction as the enrolment."""
        with self.transaction():
            rows = list(self._t("invitations").rows_where("token_digest = ?", [token_digest]))
            if not rows:
                raise InvitationError(
                    "This invitation code is not known to the coordinator. Ask the consortium "
                    "lead for a new code.",
                    code="identity.invitation_unknown",
                )
            inv = rows[0]
            if inv["used_at"] is not None:
                raise InvitationError(
                    "This invitation code has already been used. Each code enrols one site "
                    "once; ask the consortium lead for a new code.",
                    code="identity.invitation_used",
                )
            if now >= inv["expires_at"]:
                raise InvitationError(
                    "This invitation code has expired. Ask the consortium lead for a new code.",
                    code="identity.invitation_expired",
                )
            site = SiteRecord(
                site_id="site-" + uuid.uuid4().hex[:12],
                name=inv["site_name"],
                public_key=public_key,
                enrolled_at=now,
            )
            self._t("sites").insert(
                {
                    "site_id": site.site_id,
                    "name": site.name,
                    "public_key": public_key,
                    "enrolled_at": now,
                }
            )
            self._t("invitations").update(token_digest, {"used_at": now, "site_id": site.site_id})
            self.log(
                "site_enrolled", now, site_id=site.site_id, name=site.name, public_key=public_key
            )
        return site

    def site(self, site_id: str) -> SiteRecord | None:
        try:
            row = self._t("sites").get(site_id)
        except sqlite_utils.db.NotFoundError:
            return None
        return SiteRecord(row["site_id"], row["name"], row["public_key"], row["enrolled_at"])

    def sites(self) -> list[SiteRecord]:
        return [
            SiteRecord(r["site_id"], r["name"], r["public_key"], r["enrolled_at"])
            for r in self._t("sites").rows_where(order_by="enrolled_at")
        ]

    def save_site_summary(self, site_id: str, summary: dict[str, Any], now: float) -> None:
        """The latest data summary a site chose to share (counts only)."""
        with self.transaction():
            self._t("site_summaries").upsert(
                {"site_id": site_id, "summary": json.dumps(summary), "received_at": now},
                pk="site_id",
            )
            self.log("site_summary_received", now, site_id=site_id)

    def site_summaries(self) -> dict[str, dict[str, Any]]:
        return {
            r["site_id"]: json.loads(r["summary"])
            for r in self._t("site_summaries").rows_where(order_by="site_id")
        }

    # -- plans ---------------------------------------------------------------------------

    def add_plan(self, plan_hash: str, name: str, plan_json: str, signature: str, now: float):
        with self.transaction():
            self._t("plans").upsert(
                {
                    "plan_hash": plan_hash,
                    "name": name,
                    "json": plan_json,
                    "signature": signature,
                    "added_at": now,
                },
                pk="plan_hash",
            )
            self.log("plan_registered", now, plan_hash=plan_hash, name=name, signature=signature)

    def plan(self, plan_hash: str) -> dict[str, Any] | None:
        try:
            return dict(self._t("plans").get(plan_hash))
        except sqlite_utils.db.NotFoundError:
            return None

    def plans(self) -> list[dict[str, Any]]:
        return list(self._t("plans").rows_where(order_by="added_at"))

    # -- runs and rounds -----------------------------------------------------------------

    def create_run(self, plan_hash: str, model_digest: str, now: float) -> RunRecord:
        run = RunRecord(
            run_id="run-" + uuid.uuid4().hex[:12],
            plan_hash=plan_hash,
            status="running",
            current_round=1,
            model_digest=model_digest,
            created_at=now,
        )
        with self.transaction():
            self._t("runs").insert(
                {
                    "run_id": run.run_id,
                    "plan_hash": plan_hash,
                    "status": run.status,
                    "current_round": 1,
                    "model_digest": model_digest,
                    "created_at": now,
                    "finished_at": None,
                }
            )
            self.log("run_started", now, run_id=run.run_id, plan_hash=plan_hash)
        return run

    def run(self, run_id: str) -> RunRecord | None:
        try:
            r = self._t("runs").get(run_id)
        except sqlite_utils.db.NotFoundError:
            return None
        return _run(r)

    def runs(self) -> list[RunRecord]:
        return [_run(r) for r in self._t("runs").rows_where(order_by="created_at")]

    def active_run(self) -> RunRecord | None:
        rows = list(self._t("runs").rows_where("status = 'running'", order_by="created_at"))
        return _run(rows[0]) if rows else None

    def open_round(
        self, run_id: str, rnd: int, selected: list[str], model_in: str, now: float, deadline: float
    ) -> int:
        """Open (or re-open, after a failed attempt or a restart) a round. Returns the attempt."""
        with self.transaction():
            existing = list(self._t("rounds").rows_where("run_id = ? and round = ?", [run_id, rnd]))
            attempt = existing[0]["attempt"] + 1 if existing else 1
            self._t("rounds").upsert(
                {
                    "run_id": run_id,
                    "round": rnd,
                    "attempt": attempt,
                    "status": "open",
                    "opened_at": now,
                    "deadline_at": deadline,
                    "selected": json.dumps(sorted(selected)),
                    "closed_at": None,
                    "model_in": model_in,
                    "model_out": None,
                    "n_updates": 0,
                    "mean_loss": None,
                    "opt_state": None,
                },
                pk=("run_id", "round"),
            )
            self.log(
                "round_opened",
                now,
                run_id=run_id,
                round=rnd,
                attempt=attempt,
                selected=sorted(selected),
                model_in=model_in,
            )
        return attempt

    def round_row(self, run_id: str, rnd: int) -> dict[str, Any] | None:
        rows = list(self._t("rounds").rows_where("run_id = ? and round = ?", [run_id, rnd]))
        return dict(rows[0]) if rows else None

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        return [
            dict(r) for r in self._t("rounds").rows_where("run_id = ?", [run_id], order_by="round")
        ]

    def add_update(self, rec: UpdateRecord, signature: str) -> None:
        with self.transaction():
            base = self.round_row(rec.run_id, rec.round)
            self._t("updates").insert(
                {
                    "run_id": rec.run_id,
                    "round": rec.round,
                    "site_id": rec.site_id,
                    "digest": rec.digest,
                    "num_samples": rec.num_samples,
                    "train_loss": rec.train_loss,
                    "signature": signature,
                    "received_at": rec.received_at,
                },
                replace=False,
            )
            self.log(
                "update_received",
                rec.received_at,
                run_id=rec.run_id,
                round=rec.round,
                site_id=rec.site_id,
                digest=rec.digest,
                num_samples=rec.num_samples,
                base_model=base["model_in"] if base else None,
                signature=signature,
            )

    def updates(self, run_id: str, rnd: int) -> list[UpdateRecord]:
        return [
            UpdateRecord(
                r["run_id"],
                r["round"],
                r["site_id"],
                r["digest"],
                r["num_samples"],
                r["train_loss"],
                r["received_at"],
            )
            for r in self._t("updates").rows_where(
                "run_id = ? and round = ?", [run_id, rnd], order_by="site_id"
            )
        ]

    def reject_update(
        self, run_id: str, rnd: int, site_id: str, code: str, reason: str, now: float
    ) -> None:
        with self.transaction():
            self._t("rejections").insert(
                {
                    "run_id": run_id,
                    "round": rnd,
                    "site_id": site_id,
                    "code": code,
                    "reason": reason,
                    "at": now,
                }
            )
            self.log(
                "update_rejected",
                now,
                run_id=run_id,
                round=rnd,
                site_id=site_id,
                code=code,
                reason=reason,
            )

    def rejections(self, run_id: str | None = None) -> list[dict[str, Any]]:
        where, args = ("run_id = ?", [run_id]) if run_id else (None, None)
        return [dict(r) for r in self._t("rejections").rows_where(where, args, order_by="id")]

    def commit_round(
        self,
        run_id: str,
        rnd: int,
        model_out: str,
        n_updates: int,
        mean_loss: float,
        final: bool,
        now: float,
        opt_state: str | None = None,
    ) -> None:
        """Close a round and move the run on, in one transaction. ``opt_state``: digest of the
        server optimiser's state blob after this round (``None`` for other strategies)."""
        with self.transaction():
            self._t("rounds").update(
                (run_id, rnd),
                {
                    "status": "closed",
                    "closed_at": now,
                    "model_out": model_out,
                    "n_updates": n_updates,
                    "mean_loss": mean_loss,
                    "opt_state": opt_state,
                },
            )
            self._t("runs").update(
                run_id,
                {
                    "model_digest": model_out,
                    "current_round": rnd if final else rnd + 1,
                    "status": "finished" if final else "running",
                    "finished_at": now if final else None,
                },
            )
            self.log(
                "round_closed",
                now,
                run_id=run_id,
                round=rnd,
                model=model_out,
                n_updates=n_updates,
                mean_loss=mean_loss,
                inputs=[
                    {"site_id": u.site_id, "digest": u.digest, "num_samples": u.num_samples}
                    for u in self.updates(run_id, rnd)
                ],
            )
            if final:
                self.log("run_finished", now, run_id=run_id, model=model_out)
            if self.head_key is not None:
                self.ledger.sign_head(self.head_key, now, reason=f"{run_id} round {rnd}")

    def fail_round_attempt(self, run_id: str, rnd: int, reason: str, now: float) -> None:
        with self.transaction():
            self._t("rounds").update((run_id, rnd), {"status": "retrying"})
            self.log("round_retry", now, run_id=run_id, round=rnd, reason=reason)


def _run(r: dict[str, Any]) -> RunRecord:
    return RunRecord(
        r["run_id"],
        r["plan_hash"],
        r["status"],
        r["current_round"],
        r["model_digest"],
        r["created_at"],
    )
