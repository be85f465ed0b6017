"""The site's participation loop: backoff, an unreachable server, and real rounds against a
real coordinator (in this event loop, over TLS on loopback) with the site's warm worker."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import socket
from pathlib import Path

import pytest
from websockets.asyncio.server import serve

from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.server import CoordinatorServer
from shared.crypto.keys import generate_signing_key, public_key_b64, save_private_key
from shared.crypto.tls import generate_self_signed, server_ssl_context
from shared.errors import ConnectionFailed
from shared.phases import COORDINATOR_PHASES, SITE_PHASES, TIMINGS_FILE, read_timings
from shared.plan import demo_plan
from shared.synthetic import generate_federation
from site_client.core.config import SiteConfig, SiteConfigError, SiteDir
from site_client.core.enrolment import enrol
from site_client.core.governance import SiteGovernance
from site_client.core.governance_link import StandingApprovals
from site_client.core.participant import Backoff, LocalData, Participant

CHARTER = Path(__file__).parents[2] / "coordinator" / "templates" / "charter.md"


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    backoff = Backoff(base_s=0.5, cap_s=8.0)
    rng = random.Random(1)
    for attempt in range(12):
        ceiling = min(8.0, 0.5 * 2**attempt)
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.8 * ceiling  # jitter spans the range, so sites spread out


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _enrolled_site(tmp_path: Path, port: int) -> SiteDir:
    site_dir = SiteDir(tmp_path / "site")
    site_dir.ensure()
    key = generate_signing_key()
    save_private_key(key, site_dir.key_file)
    site_dir.save(
        SiteConfig(
            site_id="site-test",
            site_name="Test Hospital",
            federation="Test",
            coordinator_url=f"wss://127.0.0.1:{port}",
            fingerprint="ab" * 32,
            coordinator_key=public_key_b64(generate_signing_key()),
            enrolled_at=0.0,
        )
    )
    return site_dir


def test_an_unreachable_coordinator_is_retried_then_reported(tmp_path: Path) -> None:
    site_dir = _enrolled_site(tmp_path, _closed_port())
    statuses: list[str] = []
    participant = Participant(
        site_dir,
        LocalData(tmp_path / "dicom", tmp_path / "labels.csv"),
        backoff=Backoff(base_s=0.01, cap_s=0.05),
        on_status=statuses.append,
    )
    with pytest.raises(ConnectionFailed, match="after 3 attempts") as info:
        asyncio.run(participant.run(max_attempts=3))
    assert info.value.code == "net.unreachable"
    assert len(statuses) == 3  # each failed attempt was shown to the user
    assert all("connection lost" in s or "unreachable" in s for s in statuses)


async def test_a_coordinator_that_never_signs_the_site_in_is_left_and_retried(
    tmp_path: Path,
) -> None:
    """It accepts TLS and the websocket, then says nothing (stuck, or not a coordinator):
    pings alone would keep the site waiting for ever."""
    fingerprint = generate_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem")
    context = server_ssl_context(tmp_path / "cert.pem", tmp_path / "key.pem")
    accepted = 0

    async def silent(ws) -> None:
        nonlocal accepted
        accepted += 1
        await ws.wait_closed()

    async with serve(silent, "127.0.0.1", 0, ssl=context) as server:
        port = server.sockets[0].getsockname()[1]
        site_dir = _enrolled_site(tmp_path, port)
        site_dir.save(dataclasses.replace(site_dir.load(), fingerprint=fingerprint))
        statuses: list[str] = []
        participant = Participant(
            site_dir,
            LocalData(tmp_path / "dicom", tmp_path / "labels.csv"),
            backoff=Backoff(base_s=0.01, cap_s=0.05),
            on_status=statuses.append,
        )
        participant.welcome_timeout_s = 0.5
        with pytest.raises(ConnectionFailed, match="after 2 attempts"):
            await asyncio.wait_for(participant.run(max_attempts=2), timeout=30)
    assert accepted == 2
    assert all("did not sign this site in within 0.5 s" in s for s in statuses), statuses


def test_a_site_that_never_enrolled_is_told_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match="not enrolled yet") as info:
        Participant(SiteDir(tmp_path / "nowhere"), LocalData(tmp_path, tmp_path / "l.csv"))
    assert info.value.code == "config.not_enrolled"


# --- rounds against a real coordinator --------------------------------------------------


async def test_rounds_reuse_one_warm_worker_and_both_sides_record_their_phases(
    tmp_path: Path,
) -> None:
    """A real ``CoordinatorServer`` in this event loop, a real site enrolled with an
    invitation code, two rounds of real training in the site's warm worker."""
    data = generate_federation(
        tmp_path / "data", sites=1, seed=2, images_per_site=12, test_images=2, image_size=64
    )
    fed = Federation.init(tmp_path / "coord", CoordinatorConfig(federation="Test", port=0))
    server = CoordinatorServer(fed, admin_poll_s=0.05)
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(server.serve(ready=ready.set_result))
    try:
        await asyncio.wait_for(ready, timeout=10)
        site_dir = SiteDir(tmp_path / "site")
        config = await enrol(fed.invite("Site A"), site_dir, "Site A")
        plan = demo_plan(
            rounds=2, quorum=1, min_sites=1, input_size=32, batch_size=8, local_epochs=1
        )
        charter = fed.publish_charter(CHARTER.read_bytes())
        plan_hash = fed.add_plan(plan)
        run_id = fed.start_run(plan_hash).run_id
        workers: list[int | None] = []
        participant = Participant(
            site_dir,
            LocalData(data.sites[0].dicom_dir, data.sites[0].labels_csv),
            exit_when_done=True,
            on_status=lambda s: workers.append(participant.trainer.pid) if "sending" in s else None,
            standing=StandingApprovals(
                person="Dr. Site Lead",
                charters=frozenset({charter.sha256}),
                plans=frozenset({plan_hash}),
            ),
        )
        finished = await asyncio.wait_for(participant.run(max_attempts=3), timeout=120)

        assert finished is not None and (finished.run_id, finished.rounds) == (run_id, 2)
        assert participant.rounds_done == [(run_id, 1), (run_id, 2)]
        # one worker process trained both rounds, and it ended with the participant
        assert len(workers) == 2 and workers[0] is not None and workers[0] == workers[1]
        assert participant.trainer.pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(workers[0], 0)
        # each side recorded every phase of every round, in memory and in its timings file
        site_records = participant.timings
        assert [(r.side, r.run_id, r.round, r.site_id) for r in site_records] == [
            ("site", run_id, 1, config.site_id),
            ("site", run_id, 2, config.site_id),
        ]
        assert all(tuple(r.phases) == SITE_PHASES for r in site_records)
        assert read_timings(site_dir.root / TIMINGS_FILE) == site_records
        coord_records = server.timings
        assert [(r.side, r.round) for r in coord_records] == [
            ("coordinator", 1),
            ("coordinator", 2),
        ]
        assert all(tuple(r.phases) == COORDINATOR_PHASES for r in coord_records)
        assert read_timings(fed.paths.root / TIMINGS_FILE) == coord_records
        # governance: the charter was signed and the plan approved by the named person, the
        # site validated the model of each round (the final one too) and reported metrics only
        assert fed.store.charter_signed(config.site_id, charter.version)
        assert fed.store.plan_decision(config.site_id, plan_hash)["person"] == "Dr. Site Lead"
        validations = fed.store.validations(run_id)
        assert [v["round"] for v in validations] == [1, 2]
        assert set(validations[0]["metrics"]) == {
            "auc",
            "accuracy",
            "sensitivity",
            "specificity",
            "loss",
            "n",
        }
        assert validations[1]["model"] == fed.store.run(run_id).model_digest
        # the site checked the coordinator's tree heads and found its round-1 update in the log
        activity = SiteGovernance(
            site_dir.governance_db,
            federation="Test",
            site_id=config.site_id,
            coordinator_key=fed.public_key(),
        )
        kinds = [a["kind"] for a in activity.activity()]
        activity.close()
        assert "tree_head_checked" in kinds and "contribution_verified" in kinds
        # one clock on one machine: a site's round starts after the coordinator opened it
        for coord, site in zip(coord_records, site_records, strict=True):
            assert coord.started <= site.started <= site.ended
    finally:
        server.stop()
        await asyncio.wait_for(serving, timeout=10)
        for task in list(server._tasks):
            task.cancel()
        fed.close()


async def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("charter", [False, True], ids=["plan-not-approved", "charter-unsigned"])
async def test_a_site_takes_no_part_without_its_own_approval(tmp_path: Path, charter: bool):
    """Without a signature on the current charter the coordinator leaves the site out; without
    an approval of the plan the site declines. Either way nothing is trained or sent."""
    data = generate_federation(
        tmp_path / "data", sites=1, seed=3, images_per_site=8, test_images=2, image_size=64
    )
    fed = Federation.init(tmp_path / "coord", CoordinatorConfig(federation="Test", port=0))
    server = CoordinatorServer(fed, admin_poll_s=0.05)
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(server.serve(ready=ready.set_result))
    try:
        await asyncio.wait_for(ready, timeout=10)
        site_dir = SiteDir(tmp_path / "site")
        config = await enrol(fed.invite("Site A"), site_dir, "Site A")
        if charter:
            fed.publish_charter(CHARTER.read_bytes())
        plan = demo_plan(rounds=1, quorum=1, min_sites=1, input_size=32, round_deadline_s=60)
        run_id = fed.start_run(fed.add_plan(plan)).run_id
        statuses: list[str] = []
        participant = Participant(
            site_dir,
            LocalData(data.sites[0].dicom_dir, data.sites[0].labels_csv),
            on_status=statuses.append,
        )
        task = asyncio.create_task(participant.run())
        expected = "awaits acceptance" if charter else "is waiting for approval at this site"
        await _wait_for(lambda: any(expected in s for s in statuses))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fed.store.updates(run_id, 1) == []
        assert participant.trainer.pid is None  # no worker was ever started
        if charter:
            assert server.engine is not None and config.site_id not in server.engine.online
            assert not any("declining" in s for s in statuses)  # never invited
        else:
            assert any(s.startswith("declining round 1") for s in statuses)
    finally:
        server.stop()
        await serving
