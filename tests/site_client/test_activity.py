"""The site's activity timeline: wording, order, the real records it reads, and its exports."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shared.crypto.keys import generate_signing_key, public_key_b64, save_private_key
from shared.crypto.signing import sign
from shared.errors import StorageError
from shared.governance.policy import SitePolicy
from shared.plan import demo_plan
from shared.protocol import signed
from site_client.core.activity import (
    EXPORT_FIELDS,
    ActivityEntry,
    ImportRun,
    describe,
    export_activity,
    load_activity,
    open_governance,
    timeline,
)
from site_client.core.config import SiteConfig, SiteDir

HASH = "dde3b48d95e6" + "0" * 52
AT = datetime(2025, 5, 3, 14, 2, tzinfo=UTC).timestamp()


def _row(kind: str, at: float = AT, **detail) -> dict:
    return {"id": 0, "at": at, "kind": kind, "detail": detail}


def test_each_kind_in_plain_words() -> None:
    names = {HASH: "chest-xray v2"}
    assert describe("plan_approved", {"plan_hash": HASH, "person": "Dr. Ada Byron"}, names) == (
        "Dr. Ada Byron approved plan 'chest-xray v2' (dde3b48d95e6)"
    )
    assert describe("plan_refused", {"plan_hash": HASH, "person": "A", "reason": "No DP"}) == (
        "A refused plan dde3b48d95e6: No DP"  # no name known: the hash alone
    )
    assert describe("plan_offered", {"plan_hash": HASH, "name": "x"}) == (
        "The coordinator offered plan 'x' (dde3b48d95e6) for approval"
    )
    assert describe("charter_accepted", {"version": 2, "sha256": "ab" * 32, "person": "B"}) == (
        "B accepted charter version 2 (abababababab) and signed it with the site key"
    )
    assert describe("charter_offered", {"version": 2, "sha256": "ab" * 32}) == (
        "The coordinator offered charter version 2 (abababababab)"
    )
    policy = SitePolicy(max_epsilon=3, training_hours="19:00-07:00", cpu_share=0.25).to_dict()
    assert describe("policy_changed", policy) == (
        "The site policy was set: secure aggregation not required; differential privacy with "
        "epsilon at most 3 (delta at most 1e-05); training 19:00-07:00; up to 25% of the CPU"
    )
    assert describe("policy_changed", {"future_setting": 1}) == (
        "The site policy was set: future setting 1"
    )
    assert describe("tree_head_checked", {"size": 42, "root": "ff"}).startswith(
        "Checked the coordinator's log of events (42 entries)"
    )
    # a kind this version does not know is still shown, with its facts
    # a kind written by a later version: its facts, plainly
    assert describe("future_kind", {"round": 3, "auc": 0.91}) == "Future kind: auc 0.91, round 3"
    metrics = {"auc": 0.91, "n": 12}
    assert describe("validation_reported", {"round": 3, "run_id": "r-1", "metrics": metrics}) == (
        "Checked the shared model of round 3 of run r-1 on 12 held-out image(s) of this site "
        "(AUC 0.910) and sent the figures only"
    )
    assert describe("update_accepted", {"round": 1, "run_id": "r-1", "num_samples": 40}) == (
        "This site's model update for round 1 of run r-1 (40 training images) was signed and "
        "accepted by the coordinator; no image left the site"
    )
    assert describe("site_withdrew", {"person": "Dr. B", "reason": "audit", "run_id": "r-1"}) == (
        "Dr. B withdrew this site from run r-1: audit"
    )


def test_timeline_is_newest_first_and_names_plans_as_offered() -> None:
    rows = [
        _row("plan_offered", AT, plan_hash=HASH, name="chest-xray v2"),
        _row("plan_refused", AT + 60, plan_hash=HASH, person="A", reason="Later"),
        _row("plan_approved", AT + 60, plan_hash=HASH, person="B", reason=""),  # same minute
    ]
    runs = [
        ImportRun(
            run_id="r1",
            root="/exports/cd1",
            started_at=AT + 10,
            finished_at=AT + 30,
            status="done",
            counts={"indexed": 40, "unchanged": 0, "rejected": 2},
        ),
        ImportRun(
            run_id="r2", root="/pacs", started_at=AT + 100, finished_at=None, status="running"
        ),
    ]
    entries = timeline(rows, runs)
    assert [e.line(UTC) for e in entries] == [
        "14:03 Started importing images from /pacs (not finished)",
        "14:03 B approved plan 'chest-xray v2' (dde3b48d95e6)",
        "14:03 A refused plan 'chest-xray v2' (dde3b48d95e6): Later",
        "14:02 Imported images from /exports/cd1: 40 files indexed, 0 unchanged, 2 not usable",
        "14:02 The coordinator offered plan 'chest-xray v2' (dde3b48d95e6) for approval",
    ]
    assert [e.signed for e in entries] == [False, True, True, False, False]
    assert entries[1].person == "B" and entries[3].kind == "import_done"


def test_load_activity_reads_the_site_records(tmp_path: Path) -> None:
    coordinator = generate_signing_key()
    site_dir = SiteDir(tmp_path / "site")
    site_dir.save(
        SiteConfig("s1", "North", "Fed", "wss://c:1", "ab" * 32, public_key_b64(coordinator), 1.0)
    )
    site_key = generate_signing_key()
    save_private_key(site_key, site_dir.key_file)
    plan = demo_plan(rounds=2)
    governance = open_governance(site_dir)
    try:
        sig = sign(coordinator, signed.PLAN, signed.plan_fields(plan_hash=plan.plan_hash))
        governance.record_plan(plan.plan_hash, plan.to_dict(), sig, AT)
        governance.decide_plan(
            plan.plan_hash, approve=True, reason="", person="Dr. Ada Byron", key=site_key, now=AT
        )
    finally:
        governance.close()
    index = site_dir.open_index()
    try:
        run = index.start_run("/exports/cd1", AT + 5)
        index.finish_run(run, "cancelled", {"indexed": 3, "rejected": 1}, AT + 9)
    finally:
        index.close()

    entries = load_activity(site_dir)
    assert [e.kind for e in entries] == ["import_cancelled", "plan_approved", "plan_offered"]
    assert entries[0].text == (
        "An import from /exports/cd1 was cancelled; kept so far: 3 files indexed, "
        "0 unchanged, 1 not usable"
    )
    assert (
        entries[1].text
        == f"Dr. Ada Byron approved plan 'demo-binary-small-cnn' ({plan.plan_hash[:12]})"
    )


def _entries() -> tuple[ActivityEntry, ...]:
    return (
        ActivityEntry(
            at=AT + 60,
            kind="plan_refused",
            text='=HYPERLINK("x") refused plan dde3b48d95e6: -1 rounds',
            person='=HYPERLINK("x")',
            signed=True,
            details={"plan_hash": HASH, "reason": "-1 rounds"},
        ),
        ActivityEntry(at=AT, kind="charter_accepted", text="Zoë Ångström accepted", person="Zoë"),
    )


def test_export_to_csv_keeps_every_entry_and_disarms_formulas(tmp_path: Path) -> None:
    path = export_activity(_entries(), tmp_path / "activity.csv", tz=UTC)
    assert path == tmp_path / "activity.csv"
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(EXPORT_FIELDS)
    assert [r["time"] for r in rows] == ["2025-05-03T14:03:00+00:00", "2025-05-03T14:02:00+00:00"]
    first, second = rows
    assert first["person"] == '\'=HYPERLINK("x")'  # shown as text, never run
    assert first["what"].startswith("'=HYPERLINK")
    assert (first["kind"], first["signed"]) == ("plan_refused", "yes")
    assert json.loads(first["details"]) == {"plan_hash": HASH, "reason": "-1 rounds"}
    assert (second["what"], second["signed"]) == ("Zoë Ångström accepted", "no")
    # a name without a suffix becomes a CSV file
    assert export_activity(_entries(), tmp_path / "plain").name == "plain.csv"


def test_export_to_json(tmp_path: Path) -> None:
    path = export_activity(_entries(), tmp_path / "activity.JSON", tz=UTC)
    data = json.loads(path.read_text("utf-8"))
    assert [e["kind"] for e in data["activity"]] == ["plan_refused", "charter_accepted"]
    assert data["activity"][0] == {
        "time": "2025-05-03T14:03:00+00:00",
        "kind": "plan_refused",
        "what": '=HYPERLINK("x") refused plan dde3b48d95e6: -1 rounds',
        "person": '=HYPERLINK("x")',
        "signed": True,
        "details": {"plan_hash": HASH, "reason": "-1 rounds"},
    }


def test_export_to_a_folder_that_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file")
    with pytest.raises(StorageError, match="Choose a folder you can write to"):
        export_activity(_entries(), blocker / "activity.csv")
