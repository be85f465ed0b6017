"""The Participation page in the main window: two real rounds with a real coordinator on
loopback (the page and the status bar follow the round as it moves), closing the window while
taking part, and pause, resume and withdraw."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QMessageBox

from coordinator.federation import Federation
from shared.crypto.keys import generate_signing_key, save_private_key
from shared.plan import demo_plan
from shared.synthetic import generate_federation
from site_client.core.activity import open_governance
from site_client.core.config import SiteConfig, SiteDir
from site_client.core.enrolment import enrol
from site_client.core.governance_link import StandingApprovals
from site_client.core.participant import Backoff, LocalData
from site_client.core.participation import WITHDREW, Link, ParticipationService
from site_client.core.status import Connection
from site_client.gui.main_window import MainWindow
from site_client.gui.pages.participation import ParticipationPage
from site_client.gui.tasks import TaskRunner

WAIT_MS = 60_000
CHARTER = Path(__file__).parents[2] / "coordinator" / "templates" / "charter.md"


def test_two_real_rounds_move_the_page_and_closing_asks_first(
    qtbot, runner: TaskRunner, coordinator: Federation, tmp_path: Path
) -> None:
    data = generate_federation(
        tmp_path / "data", sites=1, seed=5, images_per_site=12, test_images=0, image_size=32
    )
    site_dir = SiteDir(tmp_path / "site")
    config = asyncio.run(enrol(coordinator.invite("Site A"), site_dir, "Site A"))
    plan = demo_plan(rounds=2, quorum=1, min_sites=1, input_size=32, batch_size=8, local_epochs=1)
    charter = coordinator.publish_charter(CHARTER.read_bytes())
    plan_hash = coordinator.add_plan(plan)
    run_id = coordinator.start_run(plan_hash).run_id
    service = ParticipationService(
        site_dir,
        LocalData(data.sites[0].dicom_dir, data.sites[0].labels_csv),
        standing=StandingApprovals(
            person="Dr. Site Lead",
            charters=frozenset({charter.sha256}),
            plans=frozenset({plan_hash}),
        ),
    )
    window = MainWindow(site_dir, config, runner, participation=service)
    qtbot.addWidget(window)
    window.show()
    try:
        _two_rounds_then_close(qtbot, window, service, run_id)
    finally:
        service.stop()  # a failed check must not leave the close question open at teardown


def _two_rounds_then_close(qtbot, window: MainWindow, service, run_id: str) -> None:
    titles = [window.sidebar.item(i).text() for i in range(window.sidebar.count())]
    assert titles == ["Data", "Governance", "Participation", "Models", "Activity", "This site"]
    window.show_page(2)
    page = window.participation_page
    assert window.stack.currentWidget() is page
    assert page.round.text() == "No run yet" and page.quality.empty.isVisible()
    assert page.privacy.text().startswith("No privacy budget used")

    page.start_button.click()
    assert not page.start_button.isEnabled() and page.pause_button.isEnabled()
    # the status bar follows the connection; the page follows the round as it moves
    qtbot.waitUntil(lambda: window.connection_state is Connection.CONNECTED, timeout=WAIT_MS)
    assert window.connection_label.text() == "Connected to 127.0.0.1"
    seen_training: list[tuple[str, int]] = []

    def training_with_progress() -> bool:
        if page.doing.text().startswith("Training") and page.progress.maximum() > 0:
            seen_training.append((page.round.text(), page.progress.maximum()))
        return bool(seen_training)

    qtbot.waitUntil(training_with_progress, timeout=WAIT_MS)
    assert seen_training[0][0].startswith(f"Run {run_id}, round ")
    qtbot.waitUntil(lambda: page.round.text() == f"Run {run_id}, round 2 of 2", timeout=WAIT_MS)
    # both rounds' shared models checked here (round 2's is the final model) and charted
    qtbot.waitUntil(lambda: len(page.loss.series["held-out loss"][0]) == 2, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: page.doing.text().startswith("Waiting"), timeout=WAIT_MS)
    rows = page.snapshot.run_history()
    assert page.quality.series["accuracy"][0] == [1, 2], rows
    assert all(0.0 <= v <= 1.0 for v in page.quality.series["accuracy"][1])
    # AUC is undefined when the held-out images are all of one class: then not drawn
    defined = [r.round for r in rows if isinstance(r.metrics.get("auc"), float)]
    assert page.quality.series["AUC"][0] == defined
    train_rounds, train_losses = page.loss.series["training loss"]
    assert train_rounds == [1, 2] and all(v > 0 for v in train_losses)
    assert not page.quality.empty.isVisible()
    assert window.activity_label.text().startswith("Waiting for the coordinator")
    assert service.running

    # closing while taking part asks; "keep taking part" minimises and training goes on
    def answer(label: str) -> None:
        box = window.close_box
        assert box is not None and "taking part in training" in box.text()
        [button] = [b for b in box.buttons() if b.text().replace("&", "") == label]
        button.click()

    QTimer.singleShot(0, lambda: answer("Keep taking part"))
    assert not window.close()
    assert window.isMinimized() and service.running
    QTimer.singleShot(0, lambda: answer("Cancel"))
    assert not window.close()
    assert service.running
    QTimer.singleShot(0, lambda: answer("Stop and close"))
    assert window.close()
    assert not service.running and service.snapshot.link is Link.IDLE


def _offline_site(tmp_path: Path, port: int) -> SiteDir:
    site_dir = SiteDir(tmp_path / "site")
    site_dir.save(
        SiteConfig(
            site_id="site-off",
            site_name="Offline Hospital",
            federation="Test federation",
            coordinator_url=f"wss://127.0.0.1:{port}",
            fingerprint="00" * 32,
            coordinator_key="",
            enrolled_at=time.time(),
        )
    )
    save_private_key(generate_signing_key(), site_dir.key_file)
    return site_dir


def test_pause_resume_and_withdraw_with_confirmation(
    qtbot, runner: TaskRunner, tmp_path: Path, closed_port: int
) -> None:
    site_dir = _offline_site(tmp_path, closed_port)
    service = ParticipationService(site_dir, backoff=Backoff(base_s=0.05, cap_s=0.2))
    page = ParticipationPage(site_dir, runner, service)
    qtbot.addWidget(page)
    page.show()
    states: list[Connection] = []
    page.connection_changed.connect(states.append)
    page.start()
    qtbot.waitUntil(lambda: "Connection lost, trying again" in page.link.text(), timeout=WAIT_MS)
    assert Connection.FAILED in states

    page.pause_button.click()
    qtbot.waitUntil(lambda: page.resume_button.isVisible(), timeout=WAIT_MS)
    assert "Paused" in page.link.text() and not service.running
    assert not page.start_button.isVisible() and states[-1] is Connection.OFFLINE
    page.resume_button.click()
    qtbot.waitUntil(lambda: "Connection lost" in page.link.text(), timeout=WAIT_MS)
    assert service.running

    # no name: nothing to confirm, the name is asked for
    assert page.ask_to_withdraw() is None
    assert "Type your name first" in page.message.text()
    page.name.setText(" Dr. Ada  Byron ")
    page.reason.setText("the ethics board asked us to pause")
    page.withdraw_button.click()
    box = page.confirm_box
    assert box is not None and box.isVisible() and "as Dr. Ada Byron" in box.text()
    box.button(QMessageBox.StandardButton.Cancel).click()
    assert service.running  # cancelled: still taking part

    page.withdraw_button.click()
    page.confirm_box.button(QMessageBox.StandardButton.Yes).click()
    qtbot.waitUntil(lambda: "Withdrawn by Dr. Ada Byron" in page.message.text(), timeout=WAIT_MS)
    assert not service.running and "Withdrawn from training" in page.link.text()
    assert page.start_button.isEnabled()  # a person may decide to take part again
    record = open_governance(site_dir)
    try:
        [row] = [a for a in record.activity() if a["kind"] == WITHDREW]
    finally:
        record.close()
    assert row["detail"]["person"] == "Dr. Ada Byron"
    assert row["detail"]["reason"] == "the ethics board asked us to pause"
