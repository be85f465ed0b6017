"""The Models page: a held release with its card and verdict, a person's refusal (signed,
replacing the automatic acceptance), predictions on imported studies and on a folder with
progress, cancel and saliency maps, and a release altered on disk that cannot be used."""

from __future__ import annotations

import csv

import pytest
from PySide6.QtCore import Qt

from shared.crypto.keys import load_private_key
from shared.releases import WEIGHTS
from shared.synthetic import generate_federation
from site_client.core.activity import open_governance
from site_client.core.governance_link import GovernanceLink, pending_disputes
from site_client.core.intake.importer import import_folder
from site_client.core.releases import AUTOMATIC, release_dir
from site_client.gui.pages.models import ModelsPage
from site_client.gui.style import ERROR, OK
from tests.gui.conftest import WAIT_MS
from tests.release_fixtures import SIZE, make_release_folder, site_holding


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_release_folder(tmp_path_factory.mktemp("coordinator"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    manifest = generate_federation(
        root, sites=1, seed=9, images_per_site=[8], test_images=0, image_size=SIZE
    )
    return manifest.sites[0].dicom_dir


@pytest.fixture
def page(qtbot, runner, tmp_path, release):
    held = site_holding(tmp_path, *release)
    page = ModelsPage(held.site_dir, runner)
    qtbot.addWidget(page)
    page.show()
    with qtbot.waitSignal(page.loaded, timeout=WAIT_MS):
        page.refresh()
    runner.wait_idle(10)
    return page


def test_the_release_is_shown_with_its_card_and_this_sites_verdict(page):
    assert [s.version for s in page.summaries] == ["1.0"]
    assert page.selected is not None and page.selected.decided_by == AUTOMATIC
    assert "not a medical device" in page.card.toPlainText()
    assert "Accepted automatically" in page.verdict.text() and OK in page.verdict.styleSheet()
    assert page.metrics.text().startswith("On 40 held-out image(s) of this site: AUC 0.875")
    assert page.accept_button.isEnabled() and page.predict.predict_button.isEnabled()


def test_a_person_refuses_the_release_with_a_reason(qtbot, page):
    page.refuse_button.click()  # no name yet: nothing is signed, the form says why
    assert page.decide_task is None and "Type your name" in page.message.text()
    page.person.setText("Dr. Ada Byron")
    page.refuse_button.click()
    assert page.decide_task is None and "Say why" in page.message.text()
    page.reason.setText("Sensitivity on our scanner is too low")
    with qtbot.waitSignal(page.decided, timeout=WAIT_MS) as decided:
        page.refuse_button.click()
    message = decided.args[0]
    assert not message.accepted and message.person == "Dr. Ada Byron"
    assert "signed with this site's key" in page.message.text()
    with qtbot.waitSignal(page.loaded, timeout=WAIT_MS):
        pass  # the list is read again after the decision
    assert page.selected is not None and page.selected.verdict == "refused"
    assert "Refused by Dr. Ada Byron: Sensitivity on our scanner is too low" in page.verdict.text()
    assert ERROR in page.verdict.styleSheet()


def test_predictions_on_imported_studies_with_saliency_and_export(
    qtbot, page, runner, images, tmp_path
):
    index = page.site_dir.open_index()
    try:
        import_folder(index, images)
    finally:
        index.close()
    panel = page.predict
    panel.refresh_studies()
    qtbot.waitUntil(lambda: panel.study_list.count() == 8, timeout=WAIT_MS)
    panel.study_list.item(0).setCheckState(Qt.CheckState.Checked)
    panel.use_studies.setChecked(True)
    progress: list[tuple[int, int]] = []
    with qtbot.waitSignal(panel.finished, timeout=WAIT_MS) as done:
        task = panel.start()
        assert task is not None
        task.progressed.connect(lambda p: progress.append((p.done, p.total)))
        assert panel.cancel_button.isEnabled() and not panel.predict_button.isEnabled()
    report = done.args[0]
    assert report.predicted and not report.cancelled and progress[-1][0] == progress[-1][1]
    assert panel.table.rowCount() == len(report.predictions)
    assert float(panel.table.item(0, 1).text()) == pytest.approx(
        report.predictions[0].probability, abs=1e-3
    )
    assert not panel.picture.pixmap().isNull()  # the first row's saliency map is shown
    assert report.csv.is_relative_to(page.site_dir.root / "predictions")
    target = panel.export_to(tmp_path / "exported.csv")
    assert target is not None
    with target.open(newline="", encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == len(report.predictions)


def test_a_folder_prediction_can_be_cancelled(qtbot, page, images):
    panel = page.predict
    panel.use_folder.setChecked(True)
    panel.folder.setText(str(images))
    with qtbot.waitSignal(panel.finished, timeout=WAIT_MS) as done:
        task = panel.start()
        assert task is not None
        panel.cancel()  # before the worker reads any file
    report = done.args[0]
    assert report.cancelled and len(report.predictions) < report.total
    assert "cancelled after" in panel.message.text()
    assert panel.predict_button.isEnabled() and not panel.cancel_button.isEnabled()


def test_nothing_to_predict_on_is_said_plainly(page):
    page.predict.use_studies.setChecked(True)
    assert page.predict.start() is None
    assert "Tick at least one study" in page.predict.message.text()


def test_a_release_altered_on_disk_cannot_be_used(qtbot, page):
    weights = release_dir(page.site_dir, "1.0") / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with qtbot.waitSignal(page.loaded, timeout=WAIT_MS):
        page.refresh()
    assert page.selected is not None and not page.selected.usable
    assert "Not usable" in page.verdict.text() and ERROR in page.verdict.styleSheet()
    assert not page.accept_button.isEnabled() and not page.refuse_button.isEnabled()
    assert not page.predict.predict_button.isEnabled()


def test_a_dispute_on_the_release_is_signed_and_kept_for_the_coordinator(qtbot, page):
    page.dispute_button.click()  # no name or reason: nothing is signed
    assert page.dispute_task is None and "what is wrong" in page.message.text()
    page.person.setText("Dr. Ada Byron")
    page.reason.setText("Our 40 validation images are missing from the model card")
    with qtbot.waitSignal(page.disputed, timeout=WAIT_MS) as raised:
        page.dispute_button.click()
    dispute = raised.args[0]
    assert (dispute.subject, dispute.release, dispute.person) == ("release", "1.0", "Dr. Ada Byron")
    record = open_governance(page.site_dir)
    try:
        key = load_private_key(page.site_dir.key_file)
        waiting = pending_disputes(GovernanceLink(record, page.site_dir.load(), key))
    finally:
        record.close()
    assert waiting == [dispute]  # sent on the next connection
    assert "raised by Dr. Ada Byron" in page.message.text()
