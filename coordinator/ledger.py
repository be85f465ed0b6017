"""The federation's provenance log kept in the coordinator's database (adapter).

Theory of operation
-------------------
Every event the store records (``Store.log``) becomes a :class:`~shared.provenance.log.LogEntry`
and a row of the ``events`` table whose ``id`` is the entry's index plus one, in the same
transaction as the change it describes: a state change without its log entry (or the reverse)
cannot be committed. The Merkle tree over those entries (RFC 6962 hashing) is rebuilt in memory
from the rows and extended as rows are added; a rolled-back transaction drops that cache, so
memory never holds an entry that the disk does not.

``sign_head`` signs the tree as it stands (purpose ``tree_head``) and stores the head; the store
signs one whenever a round closes and the exporter one for the bundle it writes. Auditors check
heads against the entries offline (:mod:`shared.provenance.bundle`); sites check each new head's
consistency with the last they saw (:mod:`shared.provenance.witness`).
"""

from __future__ import annotations

import json
from typing import Any

import sqlite_utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.canonical import canonical_json
from shared.provenance.errors import ProvenanceError
from shared.provenance.log import LogEntry, ProvenanceLog, TreeHead


class Ledger:
    """Entries and signed heads of one federation, over an open database."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db
        self._log: ProvenanceLog | None = None

    def create_tables(self) -> None:
        self.db.table("events").create(
            {"id": int, "at": float, "kind": str, "detail": str}, pk="id", if_not_exists=True
        )
        self.db.table("tree_heads").create(
            {
                "size": int,
                "root": str,
                "timestamp": float,
                "signature": str,
                "reason": str,
            },
            pk="size",
            if_not_exists=True,
        )

    def forget(self) -> None:
        """Drop the in-memory tree (after a rollback: it may hold entries never committed)."""
        self._log = None

    def log(self) -> ProvenanceLog:
        """The whole log, read from the database (incrementally after the first call)."""
        if self._log is None:
            self._log = ProvenanceLog()
        log = self._log
        rows = self.db.execute(
            "SELECT id, at, kind, detail FROM events WHERE id > ? ORDER BY id", [log.size]
        ).fetchall()
        for row_id, at, kind, detail in rows:
            if row_id != log.size + 1:
                self._log = None
                raise ProvenanceError(
                    f"The provenance log in the database has a gap before entry {row_id - 1}. "
                    "The database was damaged; restore it from a backup.",
                    code="provenance.missing_entry",
                    index=log.size,
                )
            log.append(kind, json.loads(detail), at)
        return log

    def append(self, kind: str, at: float, payload: dict[str, Any]) -> LogEntry:
        """Add the next entry. Call inside the transaction that makes the change it records."""
        entry = self.log().append(kind, payload, at)
        try:
            self.db.table("events").insert(
                {
                    "id": entry.index + 1,
                    "at": entry.at,
                    "kind": entry.kind,
                    "detail": canonical_json(entry.payload).decode("utf-8"),
                }
            )
        except BaseException:
            self._log = None
            raise
        return entry

    def sign_head(self, key: Ed25519PrivateKey, now: float, reason: str) -> TreeHead:
        """Sign and store a head over every entry so far (one per size: a repeat is reused)."""
        log = self.log()
        existing = self.head(log.size)
        if existing is not None:
            return existing
        head = log.head(key, now)
        self.db.table("tree_heads").insert({**head.to_dict(), "reason": reason})
        return head

    def head(self, size: int) -> TreeHead | None:
        rows = list(self.db.table("tree_heads").rows_where("size = ?", [size]))
        return _head(rows[0]) if rows else None

    def heads(self) -> list[TreeHead]:
        return [_head(r) for r in self.db.table("tree_heads").rows_where(order_by="size")]

    def latest_head(self) -> TreeHead | None:
        rows = list(self.db.table("tree_heads").rows_where(order_by="size desc", limit=1))
        return _head(rows[0]) if rows else None


def _head(row: dict[str, Any]) -> TreeHead:
    return TreeHead.from_dict({k: row[k] for k in ("size", "root", "timestamp", "signature")})
