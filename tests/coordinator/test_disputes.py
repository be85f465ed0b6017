"""Disputes: raised and signed at a site, recorded by the coordinator, resolved, reported."""

from __future__ import annotations

import pytest

from coordinator import governance
from coordinator.cli import main as cli
from coordinator.export import export_run
from shared.crypto.keys import generate_signing_key, public_key_b64
from shared.errors import GovernanceError
from shared.identity.invitation import decode_invitation, token_digest
from shared.provenance import bundle as layout
from shared.provenance.bundle import verify_bundle
from site_client.core.config import SiteConfig
from site_client.core.governance import SiteGovernance
from site_client.core.governance_link import GovernanceLink, pending_disputes, raise_dispute

from .conftest import build_finished_run


@pytest.fixture
def setting(tmp_path):
    built = build_finished_run(tmp_path / "coord")
    fed = built.fed
    key = generate_signing_key()
    token = decode_invitation(fed.invite("Disputing Hospital", now=600.0)).token
    site = fed.store.redeem_invitation(token_digest(token), public_key_b64(key), 601.0)
    config = SiteConfig(
        site_id=site.site_id,
        site_name="Disputing Hospital",
        federation="Audit test",
        coordinator_url="wss://127.0.0.1:1",
        fingerprint="f" * 64,
        coordinator_key=fed.public_key(),
        enrolled_at=601.0,
    )
    record = SiteGovernance(
        tmp_path / "site.db",
        federation="Audit test",
        site_id=site.site_id,
        coordinator_key=fed.public_key(),
    )
    yield built, GovernanceLink(record, config, key)
    record.close()
    fed.close()


def test_a_dispute_is_logged_by_both_sides_resolved_and_reported(setting, tmp_path, capsys):
    built, link = setting
    fed, run_id = built.fed, built.run_id
    dispute = raise_dispute(
        link,
        subject="round",
        run_id=run_id,
        rnd=2,
        release="",
        reason="Our update was left out of round 2",
        person="Dr. Quarrel",
        now=700.0,
    )
    # the site's own record keeps it, and resends it after a reconnect
    assert [a["kind"] for a in link.record.activity()] == ["dispute_raised"]
    assert pending_disputes(link) == [dispute]
    assert governance.record_dispute(fed, link.config.site_id, dispute, now=701.0)
    assert not governance.record_dispute(fed, link.config.site_id, dispute, now=702.0)
    (logged,) = fed.store.events("dispute_raised")
    assert logged["detail"]["reason"] == "Our update was left out of round 2"

    root = str(fed.paths.root)
    assert cli(["--data-dir", root, "dispute", "list", "--open"]) == 0
    assert f"{dispute.dispute_id}" in capsys.readouterr().out
    note = "Checked: it arrived after the deadline"
    assert cli(["--data-dir", root, "dispute", "resolve", dispute.dispute_id, "--note", note]) == 0
    assert cli(["--data-dir", root, "dispute", "list", "--open"]) == 0
    assert dispute.dispute_id not in capsys.readouterr().out.split("resolved\n")[-1]
    assert cli(["--data-dir", root, "dispute", "resolve", dispute.dispute_id, "--note", "x"]) == 2
    assert "already resolved" in capsys.readouterr().err

    out = export_run(fed, run_id, tmp_path / "bundle")
    page = (out.out / layout.REPORT).read_text("utf-8")
    assert "Our update was left out of round 2" in page and f"resolved: {note}" in page
    assert verify_bundle(out.out).run_id == run_id  # the dispute's signature checks out


def test_a_forged_or_malformed_dispute_is_refused(setting):
    built, link = setting
    with pytest.raises(GovernanceError, match="name the round"):
        raise_dispute(
            link,
            subject="round",
            run_id=built.run_id,
            rnd=0,
            release="",
            reason="x",
            person="A",
            now=1.0,
        )
    with pytest.raises(GovernanceError, match="say what is disputed"):
        raise_dispute(
            link,
            subject="contribution",
            run_id=built.run_id,
            rnd=0,
            release="",
            reason=" ",
            person="A",
            now=1.0,
        )
    dispute = raise_dispute(
        link,
        subject="contribution",
        run_id=built.run_id,
        rnd=0,
        release="",
        reason="Our samples are undercounted",
        person="A",
        now=1.0,
    )
    other = built.site_ids[0]  # another site cannot claim it
    with pytest.raises(GovernanceError, match="does not match this site's key"):
        governance.record_dispute(built.fed, other, dispute, now=2.0)
    assert built.fed.store.disputes() == []
