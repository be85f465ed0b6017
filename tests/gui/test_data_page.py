"""The Data page on real synthetic DICOM files: import with progress and cancel, labels with
their report, the study table's filter and sort, the preview, the charts, the PACS receiver."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pydicom
from pynetdicom import AE
from PySide6.QtCore import Qt

from shared.synthetic import FederationManifest
from site_client.core.config import SiteDir
from site_client.core.intake.importer import ImportReport
from site_client.core.pacs_settings import LOOPBACK
from site_client.core.studies import LabelChoice
from site_client.gui.main_window import MainWindow
from site_client.gui.pages.data import DataPage
from site_client.gui.tasks import Progress, TaskRunner

WAIT_MS = 20_000


def _page(qtbot, runner: TaskRunner, site_dir: SiteDir) -> DataPage:
    page = DataPage(site_dir, runner)
    qtbot.addWidget(page)
    page.resize(1100, 700)
    page.show()
    with qtbot.waitSignal(page.view_loaded, timeout=WAIT_MS):
        page.refresh()
    return page


def _import(qtbot, page: DataPage, folder: Path) -> ImportReport:
    """Import through the page and wait for the study list that follows it."""
    with qtbot.waitSignal(page.view_loaded, timeout=WAIT_MS):
        task = page.import_panel.start_import(folder)
        qtbot.waitSignal(task.finished, timeout=WAIT_MS).wait()
    assert task.result is not None
    return task.result


def _export(federation: FederationManifest, tmp_path: Path) -> Path:
    """The first site's images plus two files that cannot be used."""
    folder = tmp_path / "export"
    shutil.copytree(federation.sites[0].dicom_dir, folder)
    first = next(folder.rglob("*.dcm"))
    (folder / "README.TXT").write_text("not an image")
    (folder / "cut.dcm").write_bytes(first.read_bytes()[:1000])
    return folder


def test_import_shows_progress_in_file_counts(
    qtbot, runner: TaskRunner, site_dir: SiteDir, federation: FederationManifest, tmp_path: Path
) -> None:
    folder = _export(federation, tmp_path)
    window = MainWindow(site_dir, site_dir.load(), runner)
    qtbot.addWidget(window)
    window.show()
    panel = window.data_page.import_panel
    panel.batch_size = 5
    steps: list[tuple[Progress, str, str]] = []
    with qtbot.waitSignal(window.data_page.view_loaded, timeout=WAIT_MS):
        task = panel.start_import(folder)
        assert not panel.import_button.isEnabled() and panel.cancel_button.isEnabled()
        task.progressed.connect(
            lambda p: steps.append((p, panel.progress.text(), window.activity_label.text()))
        )
        qtbot.waitSignal(task.finished, timeout=WAIT_MS).wait()
    total = federation.sites[0].n_images + 2
    seen = [p.done for p, _, _ in steps]
    assert seen == sorted(seen) and seen[-1] == total
    assert all(p.total == total for p, _, _ in steps)
    last, bar, status = steps[-1]
    assert last.text == f"{total} of {total} files: {total - 2} indexed, 2 not usable"
    assert bar == f"{total} of {total} files"
    assert status == f"Importing images: {last.text}"  # the status bar says it too
    report = task.result
    assert (report.indexed, report.rejected, report.cancelled) == (total - 2, 2, False)
    assert f"{total - 2} files indexed" in panel.report.text()
    assert panel.import_button.isEnabled() and not panel.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: window.activity_label.text() == "Nothing running", timeout=WAIT_MS)
    # the import report: each unusable file with its reason
    rows = {
        Path(panel.rejections.index(r, 0).data()).name: panel.rejections.index(r, 1).data()
        for r in range(panel.rejections.rowCount())
    }
    assert rows == {
        "README.TXT": "Not a DICOM file.",
        "cut.dcm": "The file is cut short (an incomplete copy). Copy it again from the source.",
    }
    assert window.data_page.studies.model.rowCount() == total - 2


def test_cancel_stops_the_import_and_the_next_one_finishes(
    qtbot, runner: TaskRunner, site_dir: SiteDir, federation: FederationManifest
) -> None:
    page = _page(qtbot, runner, site_dir)
    panel = page.import_panel
    # Another program holds the index's write lock, so the import is certainly under way and
    # has not read a file yet when Cancel is pressed (no race with a fast machine).
    holder = sqlite3.connect(site_dir.index_db, isolation_level=None)
    holder.execute("begin immediate")
    task = panel.start_import(federation.sites[0].dicom_dir)
    assert panel.cancel_button.isEnabled()
    qtbot.mouseClick(panel.cancel_button, Qt.MouseButton.LeftButton)
    assert task.stop.is_set() and not panel.cancel_button.isEnabled()
    assert panel.progress_label.text() == "Stopping after the current file..."
    holder.execute("commit")
    holder.close()
    with qtbot.waitSignal(page.view_loaded, timeout=WAIT_MS):
        qtbot.waitSignal(task.finished, timeout=WAIT_MS).wait()
    assert task.state == "cancelled" and task.result.cancelled
    assert task.result.files_total == federation.sites[0].n_images
    assert "Import cancelled" in panel.report.text()
    assert "run the import again to finish" in panel.report.text()
    assert panel.import_button.isEnabled()
    assert page.studies.model.rowCount() == task.result.indexed

    report = _import(qtbot, page, federation.sites[0].dicom_dir)
    assert not report.cancelled
    assert page.studies.model.rowCount() == federation.sites[0].n_images


def test_a_labels_file_with_errors_shows_its_report(
    qtbot, runner: TaskRunner, site_dir: SiteDir, federation: FederationManifest, tmp_path: Path
) -> None:
    site = federation.sites[0]
    page = _page(qtbot, runner, site_dir)
    _import(qtbot, page, site.dicom_dir)
    header, first, *rest = site.labels_csv.read_text().splitlines()
    study = first.split(",")[0]
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "\n".join(
            [header, first, *rest, "1.2.3.4.5,SYN-NOBODY,1", f"{study},{first.split(',')[1]},2"]
        )
        + "\n"
    )
    panel = page.import_panel
    with qtbot.waitSignal(page.view_loaded, timeout=WAIT_MS):
        task = panel.load_labels(labels)
        qtbot.waitSignal(task.finished, timeout=WAIT_MS).wait()
    n = site.n_images
    text = panel.labels_report.text()
    assert "Some rows need a look" in text
    assert f"{n} of {n + 2} rows matched" in text
    assert f"1 rows match no imported image (lines {n + 2})" in text
    assert f"1 rows have a label that is not 0 or 1 (lines {n + 3})" in text
    assert {r.label for r in page.view.studies} == {"0", "1"}  # the good rows were stored
    assert runner.errors.last is None

    no_key = tmp_path / "names.csv"
    no_key.write_text("name,label\nx,1\n")
    task = panel.load_labels(no_key)
    qtbot.waitSignal(task.finished, timeout=WAIT_MS).wait()
    assert "has no column that identifies the images" in panel.labels_report.text()
    assert runner.errors.last is None  # explained in the Labels box, no second dialog


def test_the_study_table_filters_sorts_and_previews(
    qtbot, runner: TaskRunner, site_dir: SiteDir, federation: FederationManifest
) -> None:
    page = _page(qtbot, runner, site_dir)
    for site in federation.sites:
        _import(qtbot, page, site.dicom_dir)
        task = page.import_panel.load_labels(site.labels_csv)
        with qtbot.waitSignal(page.view_loaded, timeout=WAIT_MS):
            qtbot.waitSignal(task.finished, timeout=WAIT_MS).wait()
    panel = page.studies
    a, b = federation.sites
    assert panel.model.rowCount() == a.n_images + b.n_images
    assert panel.count.text() == f"{a.n_images + b.n_images} studies."

    panel.set_filter(b.manufacturer.lower())
    shown = panel.visible_rows()
    assert len(shown) == b.n_images
    assert {r.scanner for r in shown} == {f"{b.manufacturer} {b.model}"}
    assert panel.count.text() == f"Showing {b.n_images} of {a.n_images + b.n_images} studies."
    panel.set_filter(b.manufacturer, LabelChoice.POSITIVE)
    positives = panel.visible_rows()
    assert 0 < len(positives) < b.n_images and {r.label for r in positives} == {"1"}
    panel.set_filter("", LabelChoice.ANY)
    assert len(panel.visible_rows()) == a.n_images + b.n_images

    panel.table.sortByColumn(3, Qt.SortOrder.AscendingOrder)  # scanner
    scanners = [r.scanner for r in panel.visible_rows()]
    assert scanners == sorted(scanners, key=str.casefold)
    panel.table.sortByColumn(7, Qt.SortOrder.AscendingOrder)  # label: 0, 1, then none
    labels = [r.label for r in panel.visible_rows()]
    n0, n1 = labels.count("0"), labels.count("1")
    assert n0 and n1 and labels == ["0"] * n0 + ["1"] * n1 + [""] * (len(labels) - n0 - n1)
    panel.table.sortByColumn(7, Qt.SortOrder.DescendingOrder)
    assert [r.label for r in panel.visible_rows()] == labels[::-1]
    panel.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
    keys = [r.key for r in panel.visible_rows()]
    assert keys == sorted(keys)

    preview = panel.preview
    with qtbot.waitSignal(preview.rendered, timeout=WAIT_MS):
        panel.select_first()
    assert panel.selected() is not None and panel.selected().key == keys[0]
    assert preview.pixels is not None and preview.pixels.std() > 0
    assert f"Study {keys[0]}" in preview.info.text()
    before = preview.pixels.copy()
    with qtbot.waitSignal(preview.rendered, timeout=WAIT_MS):
        preview.width_box.setValue(max(preview.width_box.value() / 8, 1.0))
    assert not np.array_equal(before, preview.pixels)  # narrower window, more contrast
    assert np.mean((preview.pixels == 0) | (preview.pixels == 255)) > np.mean(
        (before == 0) | (before == 255)
    )
    with qtbot.waitSignal(preview.rendered, timeout=WAIT_MS):
        preview.reset.click()
    assert np.array_equal(before, preview.pixels)

    charts = page.summary.charts
    assert dict(charts["by_scanner"].counts) == {
        f"{a.manufacturer} {a.model}": a.n_images,
        f"{b.manufacturer} {b.model}": b.n_images,
    }
    assert sum(n for _, n in charts["by_label"].counts) == a.n_images + b.n_images
    assert f"<b>{a.n_images + b.n_images}</b> images" in page.summary.totals.text()


def test_the_pacs_receiver_switches_on_receives_and_switches_off(
    qtbot, runner: TaskRunner, site_dir: SiteDir, federation: FederationManifest
) -> None:
    window = MainWindow(site_dir, site_dir.load(), runner)
    qtbot.addWidget(window)
    window.show()
    page = window.data_page
    pacs = page.pacs
    qtbot.waitSignal(page.view_loaded, timeout=WAIT_MS).wait()
    pacs.callers.setPlainText("PACS1\n")
    pacs.host.setCurrentIndex(pacs.host.findData(LOOPBACK))
    task = pacs.start(port=0)
    qtbot.waitSignal(task.finished, timeout=WAIT_MS).wait()
    assert pacs.running and pacs.receiver is not None
    port = pacs.receiver.port
    assert f"Receiving as TESSERA on port {port} from PACS1." in pacs.status.text()
    assert window.pacs_label.text() == f"PACS receiver on (port {port})"
    assert not pacs.ae_title.isEnabled()  # settings are fixed while it runs

    image = next(federation.sites[1].dicom_dir.rglob("*.dcm"))
    ds = pydicom.dcmread(image)
    scu = AE(ae_title="PACS1")
    scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = scu.associate(LOOPBACK, port, ae_title="TESSERA")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    qtbot.waitUntil(lambda: page.studies.model.rowCount() == 1, timeout=WAIT_MS)
    assert "Received 1 image(s): 1 imported" in pacs.status.text()

    qtbot.mouseClick(pacs.toggle, Qt.MouseButton.LeftButton)
    off = "The receiver is off. " + _counts(1)
    qtbot.waitUntil(lambda: pacs.status.text() == off, timeout=WAIT_MS)
    assert not pacs.running and pacs.ae_title.isEnabled()
    assert window.pacs_label.text() == "PACS receiver off"


def _counts(received: int) -> str:
    return (
        f"Received {received} image(s): {received} imported, 0 not usable, 0 waiting; "
        "0 failed; 0 connection(s) refused."
    )


def test_a_bad_pacs_setting_is_explained(qtbot, runner: TaskRunner, site_dir: SiteDir) -> None:
    page = _page(qtbot, runner, site_dir)
    page.pacs.callers.setPlainText("")
    task = page.pacs.start(port=0)
    qtbot.waitSignal(task.finished, timeout=WAIT_MS).wait()
    assert not page.pacs.running
    assert "Name at least one PACS AE title" in page.pacs.status.text()
    assert page.pacs.toggle.isEnabled() and page.pacs.ae_title.isEnabled()
