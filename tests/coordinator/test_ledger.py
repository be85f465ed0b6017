"""The provenance log kept in the coordinator's database: atomic with the state it records."""

from __future__ import annotations

import pytest

from coordinator.store import Store
from shared.crypto.keys import generate_signing_key
from shared.errors import StorageError
from shared.governance.contributions import contributions
from shared.provenance.errors import ProvenanceError
from shared.provenance.log import ProvenanceLog


def test_entries_are_merkle_logged_and_survive_reopening(tmp_path):
    key = generate_signing_key()
    store = Store(tmp_path / "db", head_key=key)
    store.add_plan("p1", "plan one", "{}", "SIG", now=1.0)
    store.add_plan("p2", "plan two", "{}", "SIG", now=2.0)
    log = store.ledger.log()
    assert [e.kind for e in log.entries] == ["plan_registered", "plan_registered"]
    head = store.ledger.sign_head(key, 3.0, reason="test")
    store.close()
    reopened = Store(tmp_path / "db")
    rebuilt = ProvenanceLog(reopened.ledger.log().entries)
    assert rebuilt.root(head.size).hex() == head.root
    assert reopened.ledger.heads() == [head]
    reopened.close()


def test_a_rolled_back_change_leaves_no_entry(tmp_path):
    store = Store(tmp_path / "db")
    store.add_plan("p1", "plan one", "{}", "SIG", now=1.0)
    with pytest.raises(RuntimeError), store.transaction():
        store.log("plan_registered", 2.0, plan_hash="p2")
        raise RuntimeError("disk full, say")
    store.add_plan("p3", "plan three", "{}", "SIG", now=3.0)
    entries = store.ledger.log().entries
    assert [e.payload["plan_hash"] for e in entries] == ["p1", "p3"]
    assert [e.index for e in entries] == [0, 1]
    store.close()


def test_two_processes_writing_one_database_keep_one_log(tmp_path):
    """The admin CLI and the server are separate processes over the same database."""
    server, admin = Store(tmp_path / "db"), Store(tmp_path / "db")
    server.add_plan("p1", "one", "{}", "SIG", now=1.0)
    admin.add_plan("p2", "two", "{}", "SIG", now=2.0)
    server.add_plan("p3", "three", "{}", "SIG", now=3.0)
    for store in (server, admin):
        assert [e.payload["plan_hash"] for e in store.ledger.log().entries] == ["p1", "p2", "p3"]
    server.close()
    admin.close()


def test_an_unloggable_payload_rolls_the_change_back(tmp_path):
    store = Store(tmp_path / "db")
    with pytest.raises(ProvenanceError, match="cannot be logged"):
        store.add_plan("p1", "plan", "{}", float("nan"), now=1.0)  # type: ignore[arg-type]
    assert store.plans() == []
    assert store.ledger.log().size == 0
    store.close()


def test_a_gap_in_the_stored_log_is_reported(tmp_path):
    store = Store(tmp_path / "db")
    for n in range(3):
        store.add_plan(f"p{n}", "plan", "{}", "SIG", now=float(n))
    store.db.execute("DELETE FROM events WHERE id = 2")
    store.db.conn.commit()
    other = Store(tmp_path / "db")
    with pytest.raises(ProvenanceError, match="gap before entry 2"):
        other.ledger.log()
    with pytest.raises((ProvenanceError, StorageError)):
        other.add_plan("p9", "plan", "{}", "SIG", now=9.0)
    store.close()
    other.close()


def test_contribution_ledger_counts_from_the_log(finished_run):
    entries = finished_run.fed.store.ledger.log().entries
    ledger = {c.site_id: c for c in contributions(entries, finished_run.run_id)}
    north, south = (ledger[s] for s in finished_run.site_ids)
    assert (north.name, south.name) == ("North Hospital", "South Clinic")
    assert len(north.rounds_invited) == len(north.rounds_contributed) == 2
    assert (north.updates_accepted, north.samples) == (2, 100)
    assert (south.updates_accepted, south.samples) == (2, 120)
    assert contributions(entries, "run-other")[0].updates_accepted == 0
