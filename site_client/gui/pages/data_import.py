"""The Data page's first tab: import a folder, load a labels file, see what could not be used.

A thin view over ``site_client.core.site_data``: the import runs on the task runner with a
progress bar in file counts and a Cancel button (the importer stops after the current file and
keeps what it indexed), the labels file's validation report is shown as the core words it,
and the table lists every file of the index that could not be used, with the reason.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from site_client.core.config import SiteDir
from site_client.core.intake.importer import ImportReport
from site_client.core.intake.labels import LabelReport
from site_client.core.site_data import (
    APP_BATCH_SIZE,
    DataView,
    import_into_site,
    load_labels,
    progress_text,
)
from site_client.gui.errors import describe_error
from site_client.gui.models import RejectionTableModel
from site_client.gui.style import ERROR, OK, WAITING, set_message
from site_client.gui.tasks import Progress, Task, TaskRunner

__all__ = ["ImportPanel"]


def _wrapping() -> QLabel:
    label = QLabel()
    label.setWordWrap(True)
    return label


class ImportPanel(QWidget):
    changed = Signal()  # the index changed: the page reloads its view
    import_finished = Signal(object)  # ImportReport
    labels_loaded = Signal(object)  # LabelReport

    def __init__(self, site_dir: SiteDir, runner: TaskRunner, parent: QWidget | None = None):
        super().__init__(parent)
        self.site_dir = site_dir
        self.runner = runner
        self.batch_size = APP_BATCH_SIZE
        self.import_task: Task[ImportReport] | None = None
        self.labels_task: Task[LabelReport] | None = None
        self.last_report: ImportReport | None = None
        self.last_labels: LabelReport | None = None

        # -- import ------------------------------------------------------------------------
        self.import_button = QPushButton("&Import a folder...")
        self.import_button.setToolTip(
            "Choose a folder of DICOM images (a CD, a USB disk, a PACS export). Tessera reads "
            "their headers and remembers where they are; the images stay where they are."
        )
        self.import_button.clicked.connect(self.choose_folder)
        self.cancel_button = QPushButton("&Cancel import")
        self.cancel_button.setToolTip(
            "Stop after the current file. What was imported so far is kept; importing the "
            "same folder again finishes the job."
        )
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel_import)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("%v of %m files")
        self.progress.setToolTip("Files looked at so far, of all the files in the folder.")
        self.progress_label = _wrapping()
        self.report = _wrapping()
        buttons = QHBoxLayout()
        buttons.addWidget(self.import_button)
        buttons.addWidget(self.cancel_button)
        buttons.addStretch(1)
        import_box = QGroupBox("Import images")
        box = QVBoxLayout(import_box)
        box.addLayout(buttons)
        box.addWidget(self.progress)
        box.addWidget(self.progress_label)
        box.addWidget(self.report)

        # -- labels ------------------------------------------------------------------------
        self.label_column = QLineEdit("label")
        self.label_column.setToolTip(
            "The column of the labels file that holds the label (0 or 1) for each study."
        )
        self.labels_button = QPushButton("Load a &labels file...")
        self.labels_button.setToolTip(
            "A CSV file with one row per image, study or patient (StudyInstanceUID, "
            "AccessionNumber, SOPInstanceUID or PatientID) and a label column. Loading it "
            "again replaces the labels it gave before."
        )
        self.labels_button.clicked.connect(self.choose_labels)
        self.labels_report = _wrapping()
        labels_box = QGroupBox("Labels")
        form = QFormLayout()
        form.addRow("Label &column:", self.label_column)
        lbox = QVBoxLayout(labels_box)
        lbox.addLayout(form)
        lbox.addWidget(self.labels_button)
        lbox.addWidget(self.labels_report)

        # -- what could not be used --------------------------------------------------------
        self.rejections = RejectionTableModel(self)
        self.rejection_view = QTableView()
        self.rejection_view.setModel(self.rejections)
        self.rejection_view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.rejection_view.setWordWrap(False)
        self.rejection_view.verticalHeader().hide()
        header = self.rejection_view.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Interactive)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        header.resizeSection(0, 320)
        self.rejection_view.setToolTip(
            "Files in the imported folders that Tessera cannot use, and why. Fix or remove "
            "them and import the folder again."
        )
        self.rejection_caption = _wrapping()
        rejected_box = QGroupBox("Files that could not be used")
        rbox = QVBoxLayout(rejected_box)
        rbox.addWidget(self.rejection_caption)
        rbox.addWidget(self.rejection_view)

        layout = QVBoxLayout(self)
        top = QHBoxLayout()
        top.addWidget(import_box, 3)
        top.addWidget(labels_box, 2)
        layout.addLayout(top)
        layout.addWidget(rejected_box, 1)

    # -- import ----------------------------------------------------------------------------

    def choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a folder of DICOM images")
        if folder:
            self.start_import(Path(folder))

    def start_import(self, folder: Path) -> Task[ImportReport]:
        site_dir, batch = self.site_dir, self.batch_size

        def work(ctx):  # worker thread
            return import_into_site(
                site_dir,
                folder,
                progress=lambda p: ctx.progress(p.files_seen, p.files_total, progress_text(p), p),
                should_stop=ctx.should_stop,
                batch_size=batch,
            )

        self.progress.setRange(0, 0)  # busy until the folder is listed
        set_message(self.progress_label, f"Looking at {folder}...")
        set_message(self.report, "")
        self.import_task = self.runner.run(
            "Importing images",
            work,
            on_done=self._import_done,
            on_progress=self._import_progress,
            on_failed=self._import_failed,
            cancellable=True,
            owner=self,
        )
        self._busy(True)
        return self.import_task

    def cancel_import(self) -> None:
        if self.import_task is not None and self.import_task.running:
            self.import_task.cancel()
            self.cancel_button.setEnabled(False)
            set_message(self.progress_label, "Stopping after the current file...", WAITING)

    def _import_progress(self, p: Progress) -> None:
        if p.total:
            self.progress.setRange(0, p.total)
            self.progress.setValue(p.done)
        if not (self.import_task and self.import_task.stop.is_set()):
            set_message(self.progress_label, p.text)

    def _import_done(self, report: ImportReport) -> None:
        self.last_report = report
        if not report.cancelled:
            self.progress.setRange(0, max(1, report.files_total))
            self.progress.setValue(report.files_total)
        elif self.progress.maximum() == 0:  # cancelled before the folder was listed
            self.progress.setRange(0, max(1, report.files_total))
            self.progress.setValue(0)
        set_message(self.progress_label, "")
        colour = WAITING if report.cancelled or report.rejected else OK
        set_message(self.report, report.summary(), colour)
        self._busy(False)
        self.import_finished.emit(report)
        self.changed.emit()

    def _import_failed(self, exc: BaseException) -> bool:
        self._busy(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        message = describe_error(exc, "importing images", self.runner.errors.log_file)
        set_message(self.progress_label, "")
        set_message(self.report, message.text, ERROR, headline=message.title)
        self.changed.emit()  # batches written before the failure are kept
        return True

    # -- labels ----------------------------------------------------------------------------

    def choose_labels(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose the labels file", "", "CSV files (*.csv);;All files (*)"
        )
        if path:
            self.load_labels(Path(path))

    def load_labels(self, path: Path) -> Task[LabelReport]:
        site_dir, column = self.site_dir, self.label_column.text()
        set_message(self.labels_report, f"Reading {path.name}...")
        self.labels_task = self.runner.run(
            "Loading labels",
            lambda _ctx: load_labels(site_dir, path, column),
            on_done=self._labels_done,
            on_failed=self._labels_failed,
            owner=self,
        )
        self._busy(True)
        return self.labels_task

    def _labels_done(self, report: LabelReport) -> None:
        self.last_labels = report
        if report.ok:
            set_message(self.labels_report, report.summary(), OK, headline="All rows were used.")
        else:
            set_message(
                self.labels_report, report.summary(), WAITING, headline="Some rows need a look."
            )
        self._busy(False)
        self.labels_loaded.emit(report)
        self.changed.emit()

    def _labels_failed(self, exc: BaseException) -> bool:
        message = describe_error(exc, "loading labels", self.runner.errors.log_file)
        set_message(self.labels_report, message.text, ERROR, headline=message.title)
        self._busy(False)
        return True

    # -- view ------------------------------------------------------------------------------

    def show_view(self, view: DataView) -> None:
        self.rejections.set_rows(view.rejections)
        n = len(view.rejections)
        self.rejection_caption.setText(
            "Every imported file could be used."
            if n == 0
            else f"{n} file(s) in the imported folders cannot be used; the reason is given "
            "for each."
        )
        if self.last_report is None and view.last_import is not None and not self._running():
            set_message(self.report, view.last_import.summary())

    def _running(self) -> bool:
        return any(t is not None and t.running for t in (self.import_task, self.labels_task))

    def _busy(self, busy: bool) -> None:
        busy = busy or self._running()
        self.import_button.setEnabled(not busy)
        self.labels_button.setEnabled(not busy)
        importing = self.import_task is not None and self.import_task.running
        self.cancel_button.setEnabled(importing and not self.import_task.stop.is_set())
