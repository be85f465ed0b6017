"""Operator actions on a federation's data directory (init, invite, plans, runs)."""

from __future__ import annotations

import stat

import pytest

from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.federation import Federation
from shared.crypto.signing import verify
from shared.crypto.tls import fingerprint_of_file
from shared.errors import PlanError
from shared.identity.invitation import decode_invitation, token_digest
from shared.plan import demo_plan

CONFIG = CoordinatorConfig(federation="Test consortium", host="127.0.0.1", port=8765)


@pytest.fixture
def fed(tmp_path):
    f = Federation.init(tmp_path / "coord", CONFIG, now=100.0)
    yield f
    f.close()


def test_init_creates_key_certificate_and_database(tmp_path):
    root = tmp_path / "coord"
    fed = Federation.init(root, CONFIG, now=100.0)
    try:
        key = fed.paths.signing_key
        assert key.is_file()
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert stat.S_IMODE(fed.paths.tls_key.stat().st_mode) == 0o600
        assert fed.paths.tls_cert.is_file()
        assert fed.paths.database.is_file()
        assert fed.paths.blobs.is_dir()
        assert fed.store.get_meta("federation") == "Test consortium"
        (event,) = fed.store.events("federation_created")
        assert event["at"] == 100.0
        assert len(fed.public_key()) == 43
        assert fed.fingerprint() == fingerprint_of_file(fed.paths.tls_cert)
    finally:
        fed.close()
    reopened = Federation.open(root)
    try:
        assert reopened.config == CONFIG
        assert reopened.store.get_meta("federation") == "Test consortium"
    finally:
        reopened.close()


def test_init_twice_is_refused(fed):
    key_before = fed.paths.signing_key.read_bytes()
    with pytest.raises(ConfigError, match="already holds a federation") as info:
        Federation.init(fed.paths.root, CONFIG)
    assert info.value.code == "config.exists"
    assert fed.paths.signing_key.read_bytes() == key_before  # nothing was overwritten


def test_invite_code_decodes_and_its_token_is_stored(fed):
    code = fed.invite("Site A", now=1000.0, hours=2)
    inv = decode_invitation(code)
    assert inv.coordinator_url == "wss://127.0.0.1:8765"
    assert inv.fingerprint == fed.fingerprint()
    assert inv.fingerprint == fingerprint_of_file(fed.paths.tls_cert)
    assert inv.federation == "Test consortium"
    assert inv.expires_at == 1000 + 2 * 3600
    row = fed.store.db["invitations"].get(token_digest(inv.token))
    assert row["site_name"] == "Site A"
    assert row["expires_at"] == inv.expires_at
    assert row["used_at"] is None
    # only the digest is stored, never the token itself
    assert fed.store.db["invitations"].count == 1
    assert inv.token not in str(list(fed.store.db["invitations"].rows))
    # and it enrols a site once
    site = fed.store.redeem_invitation(token_digest(inv.token), "PUBKEY", now=1001.0)
    assert site.name == "Site A"


def test_add_plan_is_idempotent_and_signed(fed):
    plan = demo_plan(rounds=2)
    first = fed.add_plan(plan, now=1.0)
    second = fed.add_plan(plan, now=2.0)
    assert first == second == plan.plan_hash
    assert len(fed.store.plans()) == 1
    row = fed.store.plan(first)
    verify(fed.public_key(), "plan", {"plan_hash": first}, row["signature"])
    assert fed.plan(first) == plan
    assert fed.plan(first[:12]) == plan  # a unique prefix is enough, as in the CLI


def test_start_run_builds_a_deterministic_initial_model(tmp_path):
    plan = demo_plan(rounds=2)
    digests = []
    for name in ("one", "two"):
        fed = Federation.init(tmp_path / name, CONFIG, now=1.0)
        try:
            fed.add_plan(plan, now=2.0)
            run = fed.start_run(plan.plan_hash, now=3.0)
            assert (run.status, run.current_round, run.plan_hash) == ("running", 1, plan.plan_hash)
            assert fed.blobs.has(run.model_digest)
            assert fed.store.active_run() == run
            digests.append(run.model_digest)
        finally:
            fed.close()
    assert digests[0] == digests[1]


def test_second_concurrent_run_is_refused(fed):
    plan = demo_plan(rounds=2)
    fed.add_plan(plan, now=1.0)
    run = fed.start_run(plan.plan_hash, now=2.0)
    with pytest.raises(ConfigError, match="still running") as info:
        fed.start_run(plan.plan_hash, now=3.0)
    assert info.value.code == "run.busy"
    assert fed.store.runs() == [run]


def test_unknown_plan_hash_is_refused(fed):
    fed.add_plan(demo_plan(rounds=2), now=1.0)
    with pytest.raises(PlanError, match="no registered plan") as info:
        fed.start_run("f" * 64, now=2.0)
    assert info.value.code == "plan.unknown"
    assert fed.store.runs() == []
