"""``tessera-site charter|plan|policy|activity`` on a site that has received offers."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from shared.crypto.keys import generate_signing_key, public_key_b64, save_private_key
from shared.crypto.signing import sign, verify
from shared.governance.charter import charter_hash
from shared.plan import demo_plan
from shared.protocol import signed
from site_client.cli import main
from site_client.core.activity import open_governance
from site_client.core.config import SiteConfig, SiteDir

CHARTER = "# Terms\n\n## Data use\nOnly model updates leave this hospital.\n"


@pytest.fixture
def site(tmp_path: Path):
    coordinator, site_key = generate_signing_key(), generate_signing_key()
    site_dir = SiteDir(tmp_path / "site")
    site_dir.save(
        SiteConfig(
            site_id="site-cli",
            site_name="CLI Hospital",
            federation="Fed",
            coordinator_url="wss://coordinator.test:8443",
            fingerprint=hashlib.sha256(b"cert").hexdigest(),
            coordinator_key=public_key_b64(coordinator),
            enrolled_at=time.time(),
        )
    )
    save_private_key(site_key, site_dir.key_file)
    plan = demo_plan(rounds=3, name="chest-xray")
    record = open_governance(site_dir)
    try:
        sha = charter_hash(CHARTER)
        fields = signed.charter_fields(federation="Fed", version=1, sha256=sha)
        record.record_charter(1, sha, CHARTER, sign(coordinator, signed.CHARTER, fields), 1.0)
        signature = sign(coordinator, signed.PLAN, signed.plan_fields(plan_hash=plan.plan_hash))
        record.record_plan(plan.plan_hash, plan.to_dict(), signature, 2.0)
    finally:
        record.close()
    return site_dir, site_key, plan


def _run(site_dir: SiteDir, *argv: str) -> int:
    return main(["--data-dir", str(site_dir.root), *argv])


def test_charter_show_and_accept(site, capsys):
    site_dir, site_key, _ = site
    assert _run(site_dir, "charter", "show") == 0
    out = capsys.readouterr().out
    assert "Charter version 1" in out and "Only model updates leave" in out
    assert _run(site_dir, "charter", "accept", "--name", "Dr. Lin") == 0
    assert "accepted by Dr. Lin" in capsys.readouterr().out
    record = open_governance(site_dir)
    try:
        message = record.charter_signature(1)
    finally:
        record.close()
    verify(
        public_key_b64(site_key),
        signed.CHARTER_ACCEPT,
        signed.charter_accept_fields(
            federation="Fed", site_id="site-cli", version=1, sha256=message.sha256, person="Dr. Lin"
        ),
        message.signature,
    )
    assert _run(site_dir, "charter", "accept", "--name", "Dr. Lin", "--version", "7") == 2
    assert "is not the current charter" in capsys.readouterr().err


def test_plan_show_approve_refuse(site, capsys):
    site_dir, _, plan = site
    prefix = plan.plan_hash[:10]
    assert _run(site_dir, "plan", "list") == 0
    assert "waiting for a decision" in capsys.readouterr().out
    assert _run(site_dir, "plan", "show", prefix) == 0
    out = capsys.readouterr().out
    assert "What leaves" in out and "no patient identifiers" in out
    assert _run(site_dir, "plan", "refuse", prefix, "--name", "Dr. Lin", "--reason", " ") == 2
    assert "Say why the plan is refused" in capsys.readouterr().err
    assert _run(site_dir, "plan", "refuse", prefix, "--name", "Dr. Lin", "--reason", "IRB") == 0
    assert _run(site_dir, "plan", "list") == 0
    assert "refused by Dr. Lin" in capsys.readouterr().out
    assert _run(site_dir, "plan", "approve", prefix, "--name", "Dr. Lin") == 0
    assert _run(site_dir, "plan", "approve", "ffffff", "--name", "Dr. Lin") == 2
    assert "no single plan matches" in capsys.readouterr().err


def test_policy_blocks_approval_of_a_plan_below_it(site, capsys):
    site_dir, _, plan = site
    assert _run(site_dir, "policy", "set", "--max-epsilon", "4", "--hours", "19:00-07:00") == 0
    capsys.readouterr()
    assert _run(site_dir, "policy", "show") == 0
    out = capsys.readouterr().out
    assert "max_epsilon: 4.0" in out and "training_hours: 19:00-07:00" in out
    assert _run(site_dir, "plan", "show", plan.plan_hash[:10]) == 0
    assert "requires differential privacy" in capsys.readouterr().out
    assert _run(site_dir, "plan", "approve", plan.plan_hash[:10], "--name", "Dr. Lin") == 2
    assert "below this site's policy" in capsys.readouterr().err
    assert _run(site_dir, "policy", "set", "--cpu-percent", "0") == 2
    assert "share of the CPU" in capsys.readouterr().err


def test_activity_lists_what_was_signed(site, capsys):
    site_dir, _, plan = site
    _run(site_dir, "charter", "accept", "--name", "Dr. Lin")
    _run(site_dir, "plan", "approve", plan.plan_hash[:10], "--name", "Dr. Lin")
    capsys.readouterr()
    assert _run(site_dir, "activity", "--json") == 0
    entries = json.loads(capsys.readouterr().out)
    kinds = [e["kind"] for e in entries]
    assert "charter_accepted" in kinds and "plan_approved" in kinds
    assert _run(site_dir, "activity") == 0
    assert "Dr. Lin" in capsys.readouterr().out


def test_dispute_raise_and_list(site, capsys):
    site_dir, _, _ = site
    assert _run(site_dir, "dispute", "list") == 0
    assert "no dispute" in capsys.readouterr().out
    assert (
        _run(
            site_dir,
            "dispute",
            "raise",
            "--run",
            "run-abc",
            "--round",
            "3",
            "--reason",
            "Round 3 dropped our update",
            "--name",
            "Dr. Lin",
        )
        == 0
    )
    assert "raised by Dr. Lin" in capsys.readouterr().out
    assert _run(site_dir, "dispute", "list") == 0
    assert "run-abc round 3  Dr. Lin: Round 3 dropped our update" in capsys.readouterr().out
    assert (
        _run(
            site_dir,
            "dispute",
            "raise",
            "--run",
            "run-abc",
            "--contribution",
            "--reason",
            " ",
            "--name",
            "Dr. Lin",
        )
        == 2
    )
    assert "say what is disputed" in capsys.readouterr().err


def test_releases_without_any(site, capsys):
    site_dir, _, _ = site
    assert _run(site_dir, "releases") == 0
    assert "no model release yet" in capsys.readouterr().out
