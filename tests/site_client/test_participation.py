"""The participation service: the snapshot fold (pure), and a real participant in its own
thread against a real coordinator on loopback (two rounds), a closed port, pause and withdraw."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from coordinator.server import CoordinatorServer
from shared.crypto.keys import generate_signing_key, save_private_key
from shared.errors import TesseraError
from shared.governance.policy import SitePolicy
from shared.plan import demo_plan
from shared.synthetic import generate_federation
from site_client.core.activity import open_governance
from site_client.core.config import SiteConfig, SiteDir
from site_client.core.enrolment import enrol
from site_client.core.governance_link import StandingApprovals
from site_client.core.participant import Backoff, LocalData, PhaseEvent
from site_client.core.participation import (
    WITHDREW,
    Doing,
    Link,
    ParticipationService,
    PrivacyBudget,
    Snapshot,
    apply,
    load_history,
    with_progress,
)

CHARTER = Path(__file__).parents[2] / "coordinator" / "templates" / "charter.md"


def _fold(*events: PhaseEvent) -> Snapshot:
    snap = Snapshot()
    for event in events:
        snap = apply(snap, event)
    return snap


def test_a_round_folds_into_the_snapshot() -> None:
    snap = _fold(
        PhaseEvent("connecting"),
        PhaseEvent("connected", detail={"federation": "Chest"}),
        PhaseEvent("downloading", "run-1", 1, {"rounds": 3}),
        PhaseEvent("training", "run-1", 1),
    )
    assert (snap.link, snap.federation, snap.doing) == (Link.CONNECTED, "Chest", Doing.TRAINING)
    assert snap.round_text == "Run run-1, round 1 of 3"
    snap = with_progress(snap, 4, 10)
    assert snap.doing_text == "Training the model on this hospital's images (step 4 of 10)"
    snap = apply(snap, PhaseEvent("uploading", "run-1", 1, {"train_loss": 0.7, "num_samples": 9}))
    snap = apply(snap, PhaseEvent("accepted", "run-1", 1))
    assert snap.doing is Doing.WAITING
    # round 1's global model is validated while round 2 starts
    snap = apply(snap, PhaseEvent("downloading", "run-1", 2, {"rounds": 3}))
    snap = apply(snap, PhaseEvent("validating", "run-1", 1))
    assert (snap.round, snap.doing) == (2, Doing.VALIDATING)
    snap = apply(snap, PhaseEvent("validated", "run-1", 1, {"metrics": {"auc": 0.8}}))
    [row] = snap.run_history()
    assert (row.round, row.train_loss, row.num_samples, row.accepted) == (1, 0.7, 9, True)
    assert row.metrics == {"auc": 0.8}
    snap = apply(snap, PhaseEvent("disconnected", detail={"reason": "connection lost: reset"}))
    assert (snap.link, snap.reason, snap.active) == (
        Link.DISCONNECTED,
        "connection lost: reset",
        True,
    )
    assert apply(snap, PhaseEvent("a phase from a newer version")) == snap


def test_history_comes_from_the_governance_record_and_keeps_runs_apart() -> None:
    rows = [
        {"kind": "update_accepted", "detail": {"run_id": "b", "round": 1, "num_samples": 5}},
        {
            "kind": "validation_reported",
            "detail": {"run_id": "a", "round": 2, "metrics": {"auc": 0.6}},
        },
        {
            "kind": "validation_reported",
            "detail": {"run_id": "b", "round": 1, "metrics": {"auc": 0.7}},
        },
        {"kind": "plan_offered", "detail": {"plan_hash": "x"}},
    ]
    history = load_history(rows)
    assert [(r.run_id, r.round, r.accepted, dict(r.metrics)) for r in history] == [
        ("a", 2, False, {"auc": 0.6}),
        ("b", 1, True, {"auc": 0.7}),
    ]
    # without a current run, the page shows the latest run's rounds
    assert [r.run_id for r in Snapshot(history=history).run_history()] == ["b"]


def test_the_privacy_budget_is_described_honestly() -> None:
    assert PrivacyBudget().text.startswith("No privacy budget used")
    assert "sets no privacy budget limit" in PrivacyBudget().text
    assert "at most epsilon 3 per run" in PrivacyBudget(cap=3.0).text
    assert PrivacyBudget(spent=1.25, cap=3.0).text.startswith(
        "Privacy budget spent in this run: epsilon 1.25"
    )


def _site(tmp_path: Path, url: str) -> SiteDir:
    site_dir = SiteDir(tmp_path / "site")
    site_dir.save(
        SiteConfig(
            site_id="site-x",
            site_name="X",
            federation="Test",
            coordinator_url=url,
            fingerprint="00" * 32,
            coordinator_key="",
            enrolled_at=time.time(),
        )
    )
    save_private_key(generate_signing_key(), site_dir.key_file)
    return site_dir


def _wait(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_an_unreachable_coordinator_then_pause_and_withdraw(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = sock.getsockname()[1]
        site_dir = _site(tmp_path, f"wss://127.0.0.1:{port}")
        record = open_governance(site_dir)
        record.set_policy(SitePolicy(max_epsilon=2.0), time.time())
        record.close()
        seen: list[Snapshot] = []
        service = ParticipationService(
            site_dir, on_change=seen.append, backoff=Backoff(base_s=0.05, cap_s=0.1)
        )
        assert service.snapshot.privacy == PrivacyBudget(spent=None, cap=2.0)
        service.start()
        _wait(lambda: service.snapshot.link is Link.DISCONNECTED)
        assert service.running and service.snapshot.reason.startswith("connection lost")
        assert seen[0].link is Link.CONNECTING

        assert service.pause(timeout_s=10)
        assert not service.running and service.snapshot.link is Link.PAUSED

        service.resume()
        _wait(lambda: service.snapshot.link is Link.DISCONNECTED)
        with pytest.raises(TesseraError, match="Type your name before withdrawing"):
            service.withdraw("  ")
        assert service.running  # nothing happened without a name
        assert service.withdraw(" Dr.  Ada Byron ", "ethics board asked us to stop", timeout_s=10)
        assert not service.running and service.snapshot.link is Link.WITHDRAWN
    record = open_governance(site_dir)
    [row] = [a for a in record.activity() if a["kind"] == WITHDREW]
    record.close()
    assert row["detail"]["person"] == "Dr. Ada Byron"
    assert row["detail"]["reason"] == "ethics board asked us to stop"


def test_a_site_without_its_key_stops_with_an_alert(tmp_path: Path) -> None:
    site_dir = _site(tmp_path, "wss://127.0.0.1:9")
    site_dir.key_file.unlink()
    service = ParticipationService(site_dir)
    service.start()
    _wait(lambda: not service.running)
    snap = service.snapshot
    assert snap.link is Link.STOPPED and snap.alert


@contextlib.contextmanager
def _coordinator(root: Path) -> Iterator[tuple[Federation, CoordinatorServer]]:
    fed = Federation.init(root, CoordinatorConfig(federation="Test", port=0))
    server = CoordinatorServer(fed, admin_poll_s=0.05)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.serve(ready=lambda _port: ready.set()))
            pending = list(server._tasks)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            ready.set()
            loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(15)
    try:
        yield fed, server
    finally:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(server.stop)
        thread.join(15)
        fed.close()


def test_two_real_rounds_reach_the_snapshot(tmp_path: Path) -> None:
    data = generate_federation(
        tmp_path / "data", sites=1, seed=3, images_per_site=12, test_images=0, image_size=32
    )
    with _coordinator(tmp_path / "coord") as (fed, _server):
        site_dir = SiteDir(tmp_path / "site")
        asyncio.run(enrol(fed.invite("Site A"), site_dir, "Site A"))
        plan = demo_plan(
            rounds=2, quorum=1, min_sites=1, input_size=32, batch_size=8, local_epochs=1
        )
        charter = fed.publish_charter(CHARTER.read_bytes())
        plan_hash = fed.add_plan(plan)
        run_id = fed.start_run(plan_hash).run_id
        seen: list[Snapshot] = []
        service = ParticipationService(
            site_dir,
            LocalData(data.sites[0].dicom_dir, data.sites[0].labels_csv),
            on_change=seen.append,
            standing=StandingApprovals(
                person="Dr. Site Lead",
                charters=frozenset({charter.sha256}),
                plans=frozenset({plan_hash}),
            ),
            exit_when_done=True,
        )
        service.start()
        _wait(lambda: not service.running, timeout_s=90)
    snap = service.snapshot
    assert snap.link is Link.IDLE and not snap.alert, snap
    assert (snap.run_id, snap.round, snap.rounds) == (run_id, 2, 2)
    history = snap.run_history()
    assert [r.round for r in history] == [1, 2]
    assert all(r.accepted and r.train_loss is not None and r.train_loss > 0 for r in history)
    assert all("auc" in r.metrics and r.metrics["n"] > 0 for r in history)
    # the view saw each phase of the rounds, in order, with training progress
    doing = [s.doing for s in seen]
    for phase in (Doing.DOWNLOADING, Doing.TRAINING, Doing.UPLOADING, Doing.VALIDATING):
        assert phase in doing
    assert (
        doing.index(Doing.DOWNLOADING) < doing.index(Doing.TRAINING) < doing.index(Doing.UPLOADING)
    )
    assert any(s.doing is Doing.TRAINING and s.total > 0 for s in seen)
    assert {s.link for s in seen} >= {Link.CONNECTING, Link.CONNECTED}
    # a new service reads the same rounds back from the governance record
    again = ParticipationService(site_dir).snapshot.run_history()
    assert [(r.round, r.accepted, dict(r.metrics)) for r in again] == [
        (r.round, r.accepted, dict(r.metrics)) for r in history
    ]
