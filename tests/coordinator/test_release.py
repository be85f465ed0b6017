"""Signed model releases: what the folder and the model card hold, explicit and unique
versions, the release logged under a signed tree head, and who may receive it."""

from __future__ import annotations

import hashlib
import json

import pytest

from coordinator.cli import main as cli
from coordinator.config import ConfigError
from coordinator.export import export_run
from coordinator.release import make_release, may_receive, release_files, releases
from coordinator.store import UpdateRecord
from shared import releases as layout
from shared.crypto.keys import generate_signing_key, public_key_b64
from shared.errors import ReleaseError
from shared.identity.invitation import decode_invitation, token_digest
from shared.provenance.bundle import verify_bundle
from shared.releases import verify_release


def _summary(scanner: str, images: int) -> dict:
    return {
        "images": images,
        "patients": images // 2,
        "studies": images,
        "series": images,
        "rejected_files": 0,
        "by_modality": {"DX": images},
        "by_scanner": {scanner: images},
        "by_image_size": {"64x64": images},
        "by_pixel_spacing": {"0.5": images},
        "by_bits_stored": {"12": images},
        "by_photometric": {"MONOCHROME2": images},
        "by_label": {"label": {"0": images // 2, "1": images - images // 2}},
    }


@pytest.fixture
def released(finished_run, tmp_path):
    fed = finished_run.fed
    north, south = finished_run.site_ids
    fed.store.save_site_summary(north, _summary("Acme XR-1", 120), 900.0)
    fed.store.save_site_summary(south, _summary("Zenith DR", 80), 901.0)
    out = tmp_path / "release"
    made = make_release(fed, finished_run.run_id[:10], "1.0", out, now=1000.0)
    return made, out


def test_a_release_holds_signed_weights_card_plan_charter_and_proof(finished_run, released):
    made, out = released
    fed = finished_run.fed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            layout.MANIFEST,
            layout.WEIGHTS,
            layout.CARD_JSON,
            layout.CARD_HTML,
            layout.PLAN,
            layout.CHARTER,
            layout.PROVENANCE,
        ]
    )
    ok = verify_release(out, fed.public_key())
    fields = json.loads((out / layout.MANIFEST).read_text())["release"]
    run = fed.store.run(finished_run.run_id)
    assert fields["version"] == ok.version == made.version == "1.0"
    assert fields["run_id"] == run.run_id and fields["plan_hash"] == run.plan_hash
    assert (fields["architecture"], fields["architecture_version"]) == ("small_cnn", "1")
    assert fields["model"] == run.model_digest
    assert (
        fields["weights_sha256"] == hashlib.sha256((out / layout.WEIGHTS).read_bytes()).hexdigest()
    )
    card_bytes = (out / layout.CARD_JSON).read_bytes()
    assert fields["model_card_sha256"] == hashlib.sha256(card_bytes).hexdigest()
    # the release is an event of the log, covered by a signed head the manifest names
    (event,) = fed.store.events(layout.ENTRY_KIND)
    assert event["id"] - 1 == made.entry_index < made.head.size == fields["tree_head_size"]
    assert event["detail"]["weights_sha256"] == fields["weights_sha256"]
    assert fed.store.ledger.head(made.head.size) == made.head
    assert fields["tree_head_root"] == fed.store.ledger.log().root(made.head.size).hex()
    assert (out / layout.CHARTER).read_text().startswith("# Charter")
    assert [r.version for r in releases(fed.store)] == ["1.0"]


def test_the_model_card_says_what_the_issue_asks(finished_run, released):
    _, out = released
    card = json.loads((out / layout.CARD_JSON).read_text())
    assert "not a medical device" in card["not_a_medical_device"]
    assert "research" in card["not_a_medical_device"].lower()
    assert card["task"]["label_column"] == "label" and set(card["task"]["labels"]) == {"0", "1"}
    data = card["training_data"]
    assert {s["name"]: s["by_scanner"] for s in data["sites"]} == {
        "North Hospital": {"Acme XR-1": 120},
        "South Clinic": {"Zenith DR": 80},
    }
    assert data["by_scanner"] == {"Acme XR-1": 120, "Zenith DR": 80}
    perf = card["performance"]
    assert len(perf["sites"]) == 2 and all(r["round"] == 2 for r in perf["sites"])
    # South Clinic reported the lower AUC (0.85 against 0.9) in the last round
    assert perf["worst_site"]["name"] == "South Clinic"
    assert perf["worst_site"]["auc"] == pytest.approx(0.85)
    assert any("Acme XR-1" in line and "Zenith DR" in line for line in card["limitations"])
    assert card["privacy"]["epsilon_spent"] is None
    assert any("No differential privacy" in line for line in card["privacy"]["statements"])
    assert {p["name"]: p["updates_accepted"] for p in card["participants"]} == {
        "North Hospital": 2,
        "South Clinic": 2,
    }
    assert card["governance"]["charter_version"] == 1
    assert (
        card["governance"]["plan_hash"] == finished_run.fed.store.run(finished_run.run_id).plan_hash
    )
    page = (out / layout.CARD_HTML).read_text("utf-8")
    for text in ("not a medical device", "Worst site: South Clinic", "Zenith DR", "0.850"):
        assert text in page


def test_versions_are_explicit_and_never_reused(finished_run, released, tmp_path):
    fed = finished_run.fed
    events = len(fed.store.events())
    with pytest.raises(ReleaseError, match="already been published") as info:
        make_release(fed, finished_run.run_id, "1.0", now=2000.0)
    assert info.value.code == "release.duplicate_version"
    with pytest.raises(ReleaseError, match=r"not of the form MAJOR\.MINOR"):
        make_release(fed, finished_run.run_id, "1.0.1", now=2000.0)
    assert len(fed.store.events()) == events  # nothing logged for a refused release
    second = make_release(fed, finished_run.run_id, "1.1", now=2000.0)
    assert second.out is None  # recorded in the store only; the folder can be rebuilt
    assert [r.version for r in releases(fed.store)] == ["1.0", "1.1"]


def test_a_release_needs_a_finished_run_and_a_new_folder(finished_run, tmp_path):
    fed = finished_run.fed
    run = fed.start_run(fed.store.plans()[0]["plan_hash"], now=2000.0)
    with pytest.raises(ConfigError, match="is running; release it once it has finished"):
        make_release(fed, run.run_id, "1.0")
    with pytest.raises(ConfigError, match="no single run"):
        make_release(fed, "run-nope", "1.0")
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        make_release(fed, finished_run.run_id, "1.0", used)
    assert (used / "keep.txt").read_text() == "mine"
    assert releases(fed.store) == []


def test_the_store_rebuilds_the_same_release(finished_run, released):
    _, out = released
    files = release_files(finished_run.fed, "1.0")
    assert files == {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ReleaseError, match=r"There is no release 2\.0") as info:
        release_files(finished_run.fed, "2.0")
    assert info.value.code == "release.unknown"


def test_the_audit_bundle_still_verifies_after_a_release(finished_run, released, tmp_path):
    export_run(finished_run.fed, finished_run.run_id, tmp_path / "bundle", now=3000.0)
    ok = verify_bundle(tmp_path / "bundle")
    entries = (tmp_path / "bundle" / "provenance" / "entries.jsonl").read_text()
    assert ok.entries > released[0].head.size and layout.ENTRY_KIND in entries


def _enrol(fed, name: str, now: float) -> str:
    token = decode_invitation(fed.invite(name, now=now)).token
    key = public_key_b64(generate_signing_key())
    return fed.store.redeem_invitation(token_digest(token), key, now + 1).site_id


def test_only_sites_that_took_part_may_receive_a_release(finished_run):
    fed = finished_run.fed
    north, south = finished_run.site_ids
    late = _enrol(fed, "Late Hospital", 500.0)
    assert may_receive(fed.store, finished_run.run_id, north)
    assert may_receive(fed.store, finished_run.run_id, south)
    assert not may_receive(fed.store, finished_run.run_id, late)  # enrolled, never took part
    assert not may_receive(fed.store, finished_run.run_id, "site-unknown")
    assert not may_receive(fed.store, "run-unknown", north)
    # a second run: South is invited but its update never makes it into the round
    run = fed.start_run(fed.store.plans()[0]["plan_hash"], now=600.0)
    fed.store.open_round(run.run_id, 1, [north, south], run.model_digest, 610.0, 700.0)
    fed.store.add_update(
        UpdateRecord(run.run_id, 1, north, run.model_digest, 10, 0.5, 620.0), "signature"
    )
    fed.store.commit_round(run.run_id, 1, run.model_digest, 1, 0.5, True, 630.0)
    assert may_receive(fed.store, run.run_id, north)
    assert not may_receive(fed.store, run.run_id, south)  # invited only
    assert not may_receive(fed.store, run.run_id, late)


def test_cli_publishes_a_release_and_refuses_a_used_version(finished_run, tmp_path, capsys):
    root = str(finished_run.fed.paths.root)
    out = tmp_path / "cli-release"
    args = ["--data-dir", root, "release", finished_run.run_id, "--version", "2.0"]
    assert cli([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "release 2.0 of run" in printed and str(out) in printed
    assert verify_release(out, finished_run.fed.public_key()).version == "2.0"
    assert cli(args) == 2
    assert "release.duplicate_version" in capsys.readouterr().err
