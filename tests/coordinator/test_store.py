"""The SQLite store and the blob store, on real files in a temporary directory."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest

from coordinator.blobs import BlobStore
from coordinator.store import RunRecord, SiteRecord, Store, UpdateRecord
from shared.errors import InvitationError, StorageError

DIGEST = "ab" * 32
MODEL0 = "00" * 32
MODEL1 = "11" * 32


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


def _invite(store: Store, digest: str = DIGEST, name: str = "Site A", expires_at=2000.0):
    store.add_invitation(digest, name, now=1000.0, expires_at=expires_at)


def _update(run_id: str, rnd: int, site: str, digest: str = "cd" * 32, loss: float = 0.5):
    return UpdateRecord(run_id, rnd, site, digest, 100, loss, 1234.5)


# -- invitations and enrolment ---------------------------------------------------------------


def test_enrolment_writes_site_and_event(store):
    _invite(store)
    site = store.redeem_invitation(DIGEST, "PUBKEY", now=1500.0)
    assert site.name == "Site A"
    assert site.site_id.startswith("site-")
    assert store.site(site.site_id) == SiteRecord(site.site_id, "Site A", "PUBKEY", 1500.0)
    assert store.sites() == [site]
    events = store.events("site_enrolled")
    assert [e["detail"] for e in events] == [
        {"site_id": site.site_id, "name": "Site A", "public_key": "PUBKEY"}
    ]
    assert events[0]["at"] == 1500.0
    assert [e["kind"] for e in store.events()] == ["site_invited", "site_enrolled"]
    assert store.site("site-unknown") is None


def test_invitation_is_single_use(store):
    _invite(store)
    first = store.redeem_invitation(DIGEST, "K1", now=1500.0)
    with pytest.raises(InvitationError, match="already been used") as info:
        store.redeem_invitation(DIGEST, "K2", now=1501.0)
    assert info.value.code == "identity.invitation_used"
    assert store.sites() == [first]  # the failed attempt enrolled nobody
    assert len(store.events("site_enrolled")) == 1


def test_invitation_expiry(store):
    _invite(store, expires_at=2000.0)
    with pytest.raises(InvitationError, match="expired") as info:
        store.redeem_invitation(DIGEST, "K", now=2000.0)
    assert info.value.code == "identity.invitation_expired"
    assert store.sites() == []
    # one second earlier it would have worked
    assert store.redeem_invitation(DIGEST, "K", now=1999.0).name == "Site A"


def test_unknown_invitation(store):
    _invite(store)
    with pytest.raises(InvitationError, match="not known to the coordinator") as info:
        store.redeem_invitation("ef" * 32, "K", now=1500.0)
    assert info.value.code == "identity.invitation_unknown"
    assert store.sites() == []


# -- runs, rounds, updates -----------------------------------------------------------------


def test_run_round_update_round_trip(store):
    run = store.create_run("planhash", MODEL0, now=10.0)
    assert run == RunRecord(run.run_id, "planhash", "running", 1, MODEL0, 10.0)
    assert store.run(run.run_id) == run
    assert store.runs() == [run]
    assert store.active_run() == run
    assert store.run("run-unknown") is None

    attempt = store.open_round(run.run_id, 1, ["b", "a"], MODEL0, now=11.0, deadline=111.0)
    assert attempt == 1
    row = store.round_row(run.run_id, 1)
    assert row is not None
    assert row["status"] == "open"
    assert json.loads(row["selected"]) == ["a", "b"]
    assert (row["model_in"], row["opened_at"], row["deadline_at"]) == (MODEL0, 11.0, 111.0)
    assert store.round_row(run.run_id, 2) is None

    store.add_update(_update(run.run_id, 1, "b"), signature="SIG-B")
    store.add_update(_update(run.run_id, 1, "a", digest="ef" * 32), signature="SIG-A")
    ups = store.updates(run.run_id, 1)
    assert [u.site_id for u in ups] == ["a", "b"]
    assert ups[1] == _update(run.run_id, 1, "b")
    assert store.updates(run.run_id, 2) == []
    assert len(store.events("update_received")) == 2


def test_commit_round_moves_run_on_and_finishes_at_last_round(store):
    run = store.create_run("planhash", MODEL0, now=10.0)
    store.open_round(run.run_id, 1, ["a"], MODEL0, now=11.0, deadline=111.0)
    store.commit_round(run.run_id, 1, MODEL1, 2, 0.25, final=False, now=20.0)
    after = store.run(run.run_id)
    assert after is not None
    assert (after.status, after.current_round, after.model_digest) == ("running", 2, MODEL1)
    row = store.round_row(run.run_id, 1)
    assert row is not None
    assert (row["status"], row["model_out"], row["n_updates"], row["mean_loss"]) == (
        "closed",
        MODEL1,
        2,
        0.25,
    )

    store.open_round(run.run_id, 2, ["a"], MODEL1, now=21.0, deadline=121.0)
    store.commit_round(run.run_id, 2, "22" * 32, 1, 0.125, final=True, now=30.0)
    done = store.run(run.run_id)
    assert done is not None
    assert (done.status, done.current_round, done.model_digest) == ("finished", 2, "22" * 32)
    assert store.active_run() is None
    assert [r["round"] for r in store.rounds(run.run_id)] == [1, 2]
    assert len(store.events("run_finished")) == 1
    assert store.db["runs"].get(run.run_id)["finished_at"] == 30.0


def test_reopening_a_round_increments_the_attempt(store):
    run = store.create_run("planhash", MODEL0, now=10.0)
    assert store.open_round(run.run_id, 1, ["a", "b"], MODEL0, now=11.0, deadline=111.0) == 1
    store.fail_round_attempt(run.run_id, 1, "too few", now=111.0)
    assert store.round_row(run.run_id, 1)["status"] == "retrying"
    assert store.open_round(run.run_id, 1, ["a"], MODEL0, now=116.0, deadline=216.0) == 2
    row = store.round_row(run.run_id, 1)
    assert (row["attempt"], row["status"], row["deadline_at"]) == (2, "open", 216.0)
    assert [e["detail"]["attempt"] for e in store.events("round_opened")] == [1, 2]
    assert len(store.rounds(run.run_id)) == 1


def test_duplicate_update_raises_and_keeps_one_row(store):
    run = store.create_run("planhash", MODEL0, now=10.0)
    store.add_update(_update(run.run_id, 1, "a"), signature="S1")
    with pytest.raises(StorageError, match="database write failed") as info:
        store.add_update(_update(run.run_id, 1, "a", digest="ef" * 32), signature="S2")
    assert info.value.code == "storage.write"
    assert isinstance(info.value.__cause__, sqlite3.IntegrityError)
    assert store.updates(run.run_id, 1) == [_update(run.run_id, 1, "a")]
    assert len(store.events("update_received")) == 1  # the failed write logged nothing
    # the same site may still report for another round
    store.add_update(_update(run.run_id, 2, "a"), signature="S3")
    assert len(store.updates(run.run_id, 2)) == 1


def test_reject_update_writes_rejection_and_event(store):
    store.reject_update("run-1", 3, "site-x", "update.nan", "NaN in conv1.weight", now=50.0)
    rows = store.rejections("run-1")
    assert len(rows) == 1
    assert {k: rows[0][k] for k in ("run_id", "round", "site_id", "code", "reason", "at")} == {
        "run_id": "run-1",
        "round": 3,
        "site_id": "site-x",
        "code": "update.nan",
        "reason": "NaN in conv1.weight",
        "at": 50.0,
    }
    assert store.rejections("run-other") == []
    assert len(store.rejections()) == 1
    (event,) = store.events("update_rejected")
    assert event["detail"]["code"] == "update.nan"
    assert event["detail"]["site_id"] == "site-x"
    assert store.updates("run-1", 3) == []


def test_committed_state_survives_close_and_reopen(tmp_path):
    path = tmp_path / "state.db"
    first = Store(path)
    _invite(first)
    site = first.redeem_invitation(DIGEST, "K", now=1500.0)
    first.add_plan("planhash", "demo", "{}", "SIG", now=5.0)
    run = first.create_run("planhash", MODEL0, now=10.0)
    first.open_round(run.run_id, 1, ["a"], MODEL0, now=11.0, deadline=111.0)
    first.add_update(_update(run.run_id, 1, "a"), signature="S")
    first.commit_round(run.run_id, 1, MODEL1, 1, 0.5, final=False, now=20.0)
    first.set_meta("federation", "Consortium")
    first.close()

    second = Store(path)  # migrating again must not disturb anything
    try:
        assert second.get_meta("federation") == "Consortium"
        assert second.get_meta("schema_version") == "1"
        assert second.get_meta("missing", "dflt") == "dflt"
        assert second.sites() == [site]
        assert second.plan("planhash")["signature"] == "SIG"
        assert second.plan("unknown") is None
        reopened = second.run(run.run_id)
        assert reopened is not None
        assert (reopened.current_round, reopened.model_digest) == (2, MODEL1)
        assert second.updates(run.run_id, 1) == [_update(run.run_id, 1, "a")]
        assert second.round_row(run.run_id, 1)["status"] == "closed"
        with pytest.raises(InvitationError, match="already been used") as info:
            second.redeem_invitation(DIGEST, "K2", now=1600.0)
        assert info.value.code == "identity.invitation_used"
    finally:
        second.close()


def test_unopenable_database_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError, match="cannot open") as info:
        Store(tmp_path / "no-such-dir" / "state.db")
    assert info.value.code == "storage.open"


# -- blobs ---------------------------------------------------------------------------------


def test_blob_round_trip(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    data = b"model bytes \x00\x01" * 100
    digest = blobs.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert blobs.has(digest)
    assert blobs.get(digest) == data
    assert blobs.put(memoryview(b"view")) == hashlib.sha256(b"view").hexdigest()


def test_blobs_are_content_addressed(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    first = blobs.put(b"same")
    second = blobs.put(b"same")
    assert first == second
    files = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert files == [blobs.path(first)]  # one file, and no temporary left behind
    assert blobs.put(b"other") != first


def test_corrupted_blob_is_detected(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    digest = blobs.put(b"original")
    blobs.path(digest).write_bytes(b"origin4l")
    with pytest.raises(StorageError, match="corrupted") as info:
        blobs.get(digest)
    assert info.value.code == "storage.blob"


def test_missing_blob_is_a_storage_error(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    assert not blobs.has("12" * 32)
    with pytest.raises(StorageError, match="missing") as info:
        blobs.get("12" * 32)
    assert info.value.code == "storage.blob"
