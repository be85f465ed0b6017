"""Export and offline verification of a run's bundle, and what tampering with it does."""

from __future__ import annotations

import json

import pytest

from coordinator.cli import main as cli
from coordinator.config import ConfigError
from coordinator.export import export_run
from shared.crypto.signing import verify
from shared.provenance import bundle as layout
from shared.provenance.bundle import verify_bundle
from shared.provenance.errors import ProvenanceError
from shared.tensors import read_metadata


@pytest.fixture
def exported(finished_run, tmp_path):
    out = tmp_path / "bundle"
    export_run(finished_run.fed, finished_run.run_id, out, now=1000.0)
    return out


def test_export_writes_a_bundle_that_verifies(finished_run, exported):
    ok = verify_bundle(exported)
    assert ok.run_id == finished_run.run_id
    assert ok.sites == 2 and ok.updates == 4
    manifest = json.loads((exported / layout.MANIFEST).read_text())
    assert manifest["run_id"] == finished_run.run_id
    assert ok.head.size == ok.entries == finished_run.fed.store.ledger.log().size
    metadata = read_metadata((exported / layout.MODEL).read_bytes())
    assert metadata["run_id"] == finished_run.run_id
    assert (
        metadata["weights_sha256"] == finished_run.fed.store.run(finished_run.run_id).model_digest
    )
    assert (exported / layout.charter_file(1)).read_bytes().startswith(b"# Charter")
    (export_event,) = finished_run.fed.store.events("model_exported")
    assert export_event["detail"]["file_sha256"] == ok.model_sha256


def test_every_closed_round_has_a_signed_tree_head(finished_run):
    ledger = finished_run.fed.store.ledger
    heads = ledger.heads()
    assert len(heads) == 2  # one per closed round
    for head in heads:
        head.verify(finished_run.fed.public_key())
        assert ledger.log().root(head.size).hex() == head.root


def test_report_is_filled_from_the_run(exported, finished_run):
    page = (exported / layout.REPORT).read_text("utf-8")
    assert "<svg" in page and "polyline" in page  # the per-round chart
    assert "North Hospital" in page and "South Clinic" in page
    assert finished_run.run_id in page
    assert "Charter of the Example Chest Imaging Consortium" in page
    assert json.loads((exported / layout.MANIFEST).read_text())["head"]["root"] in page
    assert "No differential privacy" in page


def test_prov_view_names_sites_models_and_rounds(exported, finished_run):
    prov = json.loads((exported / layout.PROV).read_text())
    for site_id in finished_run.site_ids:
        assert f"tessera:{site_id}" in prov["agent"]
    assert f"tessera:{finished_run.run_id}-round-2" in prov["activity"]
    models = [k for k, v in prov["entity"].items() if v["prov:type"] == "tessera:Model"]
    assert len(models) == 3  # the initial model and one per round
    derived = prov["wasDerivedFrom"].values()
    assert sum(1 for d in derived if d["prov:generatedEntity"].startswith("tessera:model-")) == 4


def test_export_refuses_an_unfinished_run_and_a_used_folder(finished_run, tmp_path):
    fed = finished_run.fed
    run = fed.start_run(fed.store.plans()[0]["plan_hash"], now=2000.0)
    with pytest.raises(ConfigError, match="export it once it has finished"):
        export_run(fed, run.run_id, tmp_path / "new")
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_run(fed, finished_run.run_id, used)
    assert (used / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="no single run"):
        export_run(fed, "run-nope", tmp_path / "other")


def test_cli_exports_and_verifies(finished_run, tmp_path, capsys):
    root = finished_run.fed.paths.root
    out = tmp_path / "cli-bundle"
    assert (
        cli(["--data-dir", str(root), "export", finished_run.run_id[:10], "--out", str(out)]) == 0
    )
    assert cli(["verify", str(out)]) == 0
    assert "bundle OK" in capsys.readouterr().out
    model = out / layout.MODEL
    data = bytearray(model.read_bytes())
    data[-1] ^= 0x01
    model.write_bytes(bytes(data))
    assert cli(["verify", str(out)]) == 1
    assert "bundle.model_mismatch" in capsys.readouterr().err


# --- tampering: each change is caught, and the error names it --------------------------------


def _lines(bundle):
    return (bundle / layout.ENTRIES).read_bytes().splitlines(keepends=True)


def _write_lines(bundle, lines):
    (bundle / layout.ENTRIES).write_bytes(b"".join(lines))


def _edit_json(bundle, name, change):
    path = bundle / name
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def _flip_char(text: str, at: int) -> str:
    ch = text[at]
    return text[:at] + ("B" if ch == "A" else "A") + text[at + 1 :]


def test_changing_any_byte_of_an_entry_is_caught(exported):
    original = (exported / layout.ENTRIES).read_bytes()
    positions = range(0, len(original) - 1, max(1, len(original) // 40))
    for pos in positions:
        if original[pos : pos + 1] == b"\n":
            continue
        data = bytearray(original)
        data[pos] = ord("7") if data[pos] != ord("7") else ord("8")
        (exported / layout.ENTRIES).write_bytes(bytes(data))
        with pytest.raises(ProvenanceError) as info:
            verify_bundle(exported)
        assert info.value.code in {
            "bundle.root_mismatch",
            "bundle.bad_entry",
            "bundle.key_mismatch",
        }, pos
    (exported / layout.ENTRIES).write_bytes(original)
    verify_bundle(exported)


def test_a_removed_entry_is_caught(exported):
    lines = _lines(exported)
    del lines[3]
    _write_lines(exported, lines)
    with pytest.raises(ProvenanceError, match="line 4 holds entry 4: an entry was removed"):
        verify_bundle(exported)


def test_two_swapped_entries_are_caught(exported):
    lines = _lines(exported)
    lines[4], lines[5] = lines[5], lines[4]
    _write_lines(exported, lines)
    with pytest.raises(ProvenanceError, match="line 5 holds entry 5") as info:
        verify_bundle(exported)
    assert info.value.code == "bundle.entry_order"


def test_an_entry_rewritten_with_its_index_kept_is_caught(exported):
    lines = _lines(exported)
    for i, line in enumerate(lines):
        entry = json.loads(line)
        if entry["kind"] == "update_received":
            entry["payload"]["num_samples"] += 1000
            lines[i] = json.dumps(entry, separators=(",", ":"), sort_keys=True).encode() + b"\n"
            break
    _write_lines(exported, lines)
    with pytest.raises(ProvenanceError, match="does not match the entries it covers") as info:
        verify_bundle(exported)
    assert info.value.code == "bundle.root_mismatch"


@pytest.mark.parametrize("field", ["signature", "root", "timestamp", "size"])
def test_a_changed_tree_head_is_caught(exported, field):
    def change(heads):
        head = heads[-1]
        if field == "size":
            head["size"] -= 1
        elif field == "timestamp":
            head["timestamp"] += 1
        elif field == "root":
            head["root"] = (
                head["root"][:10] + ("0" if head["root"][10] != "0" else "1") + head["root"][11:]
            )
        else:
            head[field] = _flip_char(head[field], 10)

    _edit_json(exported, layout.HEADS, change)
    with pytest.raises(ProvenanceError, match=r"tree head 3 .* not signed by the coordinator"):
        verify_bundle(exported)


def test_a_changed_update_signature_is_caught_even_with_heads_re_signed(exported, finished_run):
    """A coordinator that forges a site's update must also re-sign heads; the site key still
    catches it."""
    from shared.provenance.log import LogEntry, ProvenanceLog

    entries = [LogEntry.from_dict(json.loads(line)) for line in _lines(exported)]
    forged = []
    for e in entries:
        payload = dict(e.payload)
        if e.kind == "update_received" and not forged:
            payload["signature"] = _flip_char(payload["signature"], 5)
            forged.append(e.index)
        forged_entry = LogEntry(index=e.index, kind=e.kind, at=e.at, payload=payload)
        entries[e.index] = forged_entry
    log = ProvenanceLog(entries)
    key = finished_run.fed.signing_key()
    heads = [log.head(key, 1.0, size) for size in (forged[0] + 1, len(entries))]
    _write_lines(exported, [e.leaf_bytes() + b"\n" for e in entries])
    (exported / layout.HEADS).write_text(json.dumps([h.to_dict() for h in heads]))
    _edit_json(exported, layout.MANIFEST, lambda m: m.update(head=heads[-1].to_dict()))
    with pytest.raises(ProvenanceError, match="does not carry that site's signature") as info:
        verify_bundle(exported)
    assert info.value.code == "bundle.bad_signature"


def test_a_changed_coordinator_key_is_caught(exported):
    _edit_json(
        exported, layout.KEYS, lambda k: k.update(coordinator=_flip_char(k["coordinator"], 3))
    )
    with pytest.raises(ProvenanceError, match=r"coordinator key .* not the one the log"):
        verify_bundle(exported)


def test_a_changed_site_key_is_caught(exported, finished_run):
    site = finished_run.site_ids[1]

    def change(keys):
        keys["sites"][site] = _flip_char(keys["sites"][site], 7)

    _edit_json(exported, layout.KEYS, change)
    with pytest.raises(ProvenanceError, match=f"public key of {site}") as info:
        verify_bundle(exported)
    assert info.value.code == "bundle.key_mismatch"


def test_a_changed_model_byte_is_caught(exported):
    model = exported / layout.MODEL
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x40
    model.write_bytes(bytes(data))
    with pytest.raises(ProvenanceError, match="not a model file the log says was exported"):
        verify_bundle(exported)


def test_a_changed_charter_or_plan_is_caught(exported):
    charter = exported / layout.charter_file(1)
    original = charter.read_bytes()
    charter.write_bytes(original.replace(b"30 days", b"90 days"))
    with pytest.raises(ProvenanceError, match="not the charter version 1 logged"):
        verify_bundle(exported)
    charter.write_bytes(original)
    _edit_json(exported, layout.PLAN, lambda p: p.update(local_epochs=p["local_epochs"] + 1))
    with pytest.raises(ProvenanceError, match=r"not the plan named in manifest\.json"):
        verify_bundle(exported)


def test_a_changed_prov_view_or_missing_file_is_caught(exported):
    _edit_json(exported, layout.PROV, lambda p: p["agent"].clear())
    with pytest.raises(ProvenanceError, match=r"prov\.json does not match the log entries"):
        verify_bundle(exported)
    (exported / layout.KEYS).unlink()
    with pytest.raises(ProvenanceError, match=r"keys\.json is missing"):
        verify_bundle(exported)


def test_plan_signature_in_the_log_is_the_coordinators(finished_run):
    (event,) = finished_run.fed.store.events("plan_registered")
    from shared.protocol import signed

    detail = event["detail"]
    verify(
        finished_run.fed.public_key(),
        signed.PLAN,
        signed.plan_fields(plan_hash=detail["plan_hash"]),
        detail["signature"],
    )


def test_report_names_the_worst_site_and_shows_validation(exported):
    page = (exported / layout.REPORT).read_text("utf-8")
    assert "Worst site: South Clinic" in page
    assert "validation AUC" in page
    assert "0.850" in page  # North Hospital's AUC after round 2 (0.7 + 0.2 - 0.05 * 0)


def test_a_forged_charter_signature_in_the_log_is_caught(exported, finished_run):
    """Even a coordinator re-signing every head cannot invent a site's charter signature."""
    from shared.provenance.log import LogEntry, ProvenanceLog

    entries = [LogEntry.from_dict(json.loads(line)) for line in _lines(exported)]
    for i, e in enumerate(entries):
        if e.kind == "charter_signed":
            entries[i] = LogEntry(
                index=e.index, kind=e.kind, at=e.at, payload={**e.payload, "person": "Nobody"}
            )
            break
    log = ProvenanceLog(entries)
    head = log.head(finished_run.fed.signing_key(), 1.0)
    _write_lines(exported, [e.leaf_bytes() + b"\n" for e in entries])
    (exported / layout.HEADS).write_text(json.dumps([head.to_dict()]))
    _edit_json(exported, layout.MANIFEST, lambda m: m.update(head=head.to_dict()))
    with pytest.raises(ProvenanceError, match=r"charter signed entry .* does not carry"):
        verify_bundle(exported)


def test_report_lists_charter_signatures_and_plan_approvals(exported):
    page = (exported / layout.REPORT).read_text("utf-8")
    assert "Plan approvals" in page
    assert page.count("Dr. Reviewer 0") >= 2  # signed the charter and approved the plan
    assert ">approved<" in page
