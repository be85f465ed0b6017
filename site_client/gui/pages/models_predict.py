"""The Models page's Predictions tab: run a held release on this site's studies or a folder.

A thin view over ``core.release_view.predict_with_release`` on the task runner: progress with
file counts and a Cancel button (a cancelled job keeps what it predicted), then a table of
every file with its probability or the reason it could not be used, and the selected image's
saliency map (Grad-CAM) beside it. The results, the CSV and the pictures live in the site
folder (``predictions/``); "Export CSV..." copies the CSV where the person chooses. Nothing of
it leaves this computer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from site_client.core.config import SiteDir
from site_client.core.predict import PredictionReport
from site_client.core.release_view import predict_with_release
from site_client.core.studies import StudyRow, list_studies
from site_client.gui.errors import describe_error
from site_client.gui.style import ERROR, OK, WAITING, set_message
from site_client.gui.tasks import Progress, Task, TaskContext, TaskRunner

__all__ = ["PredictPanel"]

COLUMNS = ("File", "Probability", "Label", "Result")


def _studies(site_dir: SiteDir) -> tuple[StudyRow, ...]:
    index = site_dir.open_index()
    try:
        return list_studies(index)
    finally:
        index.close()


class PredictPanel(QWidget):
    finished = Signal(object)  # PredictionReport

    def __init__(self, site_dir: SiteDir, runner: TaskRunner, parent: QWidget | None = None):
        super().__init__(parent)
        self.site_dir = site_dir
        self.runner = runner
        self.version = ""
        self.report: PredictionReport | None = None
        self.task: Task[PredictionReport] | None = None
        self.studies_task: Task[tuple[StudyRow, ...]] | None = None

        self.use_studies = QRadioButton("&Studies imported at this site")
        self.use_studies.setChecked(True)
        self.study_list = QListWidget()
        self.study_list.setToolTip("Tick the studies to predict on.")
        self.study_list.setMaximumHeight(120)
        self.use_folder = QRadioButton("A &folder of DICOM files")
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("a folder on this computer or a mounted share")
        self.browse = QPushButton("&Browse...")
        self.browse.clicked.connect(self._choose_folder)
        self.saliency = QCheckBox("Draw &saliency maps (where the model looked)")
        self.saliency.setChecked(True)
        self.saliency.setToolTip(
            "Grad-CAM: a heat map over each image of the regions that raised the model's "
            "score. It shows where the model looked, not a diagnosis."
        )
        self.predict_button = QPushButton("&Predict")
        self.predict_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_button.setEnabled(False)
        self.export_button = QPushButton("&Export CSV...")
        self.export_button.setToolTip("Save the predictions as a CSV file for a spreadsheet.")
        self.export_button.clicked.connect(self._choose_export)
        self.export_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setFormat("%v of %m files")
        self.progress.hide()
        self.message = QLabel()
        self.message.setWordWrap(True)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setAlternatingRowColors(True)
        self.table.verticalHeader().hide()
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for column in (1, 2):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.Interactive)
        self.table.itemSelectionChanged.connect(self._show_selected)
        self.picture = QLabel("Select a prediction to see its saliency map.")
        self.picture.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.picture.setMinimumSize(260, 260)
        self.picture.setWordWrap(True)

        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folder, 1)
        folder_row.addWidget(self.browse)
        buttons = QHBoxLayout()
        buttons.addWidget(self.saliency)
        buttons.addStretch(1)
        buttons.addWidget(self.predict_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.export_button)
        results = QSplitter()
        results.addWidget(self.table)
        results.addWidget(self.picture)
        results.setStretchFactor(0, 3)
        results.setStretchFactor(1, 2)
        layout = QVBoxLayout(self)
        note = QLabel(
            "Predictions, their table and the pictures stay on this computer, in the site "
            "folder. Research use only: not a medical device, not for diagnosis."
        )
        note.setWordWrap(True)
        layout.addWidget(note)
        layout.addWidget(self.use_studies)
        layout.addWidget(self.study_list)
        layout.addWidget(self.use_folder)
        layout.addLayout(folder_row)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.message)
        layout.addWidget(results, 1)
        self.set_release("")

    # -- inputs ----------------------------------------------------------------------------

    def set_release(self, version: str, usable: bool = True) -> None:
        """Predict with ``version`` from now on ("" or not usable: the button is off)."""
        self.version = version if usable else ""
        busy = self.task is not None and self.task.running
        self.predict_button.setEnabled(bool(self.version) and not busy)
        if not version:
            set_message(self.message, "This site holds no usable model release yet.")
        elif not usable:
            set_message(self.message, f"Release {version} cannot be used (see its card).", ERROR)
        elif not busy:
            set_message(self.message, f"Predictions use release {version}.")

    def refresh_studies(self) -> Task[tuple[StudyRow, ...]]:
        site_dir = self.site_dir
        self.studies_task = self.runner.run(
            "Reading the imported studies",
            lambda _ctx: _studies(site_dir),
            on_done=self._studies_loaded,
            owner=self,
        )
        return self.studies_task

    def _studies_loaded(self, rows: tuple[StudyRow, ...]) -> None:
        self.study_list.clear()
        for row in rows:
            text = (
                f"{row.key}  {row.modality} {row.body_part}  {row.scanner}  ({row.images} images)"
            )
            item = QListWidgetItem(text)
            item.setData(Qt.ItemDataRole.UserRole, row.study_uid)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Unchecked)
            self.study_list.addItem(item)
        if not rows:
            self.use_folder.setChecked(True)

    def chosen_studies(self) -> list[str]:
        out = []
        for i in range(self.study_list.count()):
            item = self.study_list.item(i)
            if item is not None and item.checkState() == Qt.CheckState.Checked:
                out.append(str(item.data(Qt.ItemDataRole.UserRole)))
        return out

    def _choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder of DICOM files to predict on")
        if path:
            self.folder.setText(path)
            self.use_folder.setChecked(True)

    # -- the job ---------------------------------------------------------------------------

    def start(self) -> Task[PredictionReport] | None:
        if not self.version or (self.task is not None and self.task.running):
            return None
        studies = self.chosen_studies() if self.use_studies.isChecked() else []
        folder = Path(self.folder.text().strip()) if self.use_folder.isChecked() else None
        if self.use_studies.isChecked() and not studies:
            set_message(self.message, "Tick at least one study, or choose a folder.", WAITING)
            return None
        if folder is not None and not self.folder.text().strip():
            set_message(self.message, "Choose the folder to predict on.", WAITING)
            return None
        site_dir, version, saliency = self.site_dir, self.version, self.saliency.isChecked()

        def work(ctx: TaskContext) -> PredictionReport:
            return predict_with_release(
                site_dir,
                version,
                study_uids=studies,
                folder=folder,
                saliency=saliency,
                progress=lambda done, total: ctx.progress(done, total, "files"),
                should_stop=ctx.should_stop,
            )

        self.table.setRowCount(0)
        self.picture.setPixmap(QPixmap())
        self.export_button.setEnabled(False)
        self.predict_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setRange(0, 0)
        self.progress.show()
        set_message(self.message, f"Predicting with release {version}...")
        self.task = self.runner.run(
            f"Predicting with model release {version}",
            work,
            on_done=self._done,
            on_failed=self._failed,
            on_progress=self._progressed,
            cancellable=True,
            owner=self,
        )
        return self.task

    def cancel(self) -> None:
        if self.task is not None and self.task.running:
            self.task.cancel()
            set_message(self.message, "Stopping after the current images...")

    def _progressed(self, p: Progress) -> None:
        if p.total:
            self.progress.setRange(0, p.total)
            self.progress.setValue(p.done)

    def _idle(self) -> None:
        self.progress.hide()
        self.cancel_button.setEnabled(False)
        self.predict_button.setEnabled(bool(self.version))

    def _done(self, report: PredictionReport) -> None:
        self._idle()
        self.report = report
        self.table.setRowCount(len(report.predictions))
        for row, p in enumerate(report.predictions):
            if p.predicted:
                cells = (p.file, f"{p.probability:.3f}", str(p.predicted_label), "predicted")
            else:
                cells = (p.file, "", "", f"not usable: {p.reason}")
            for column, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(text)
                if column in (1, 2):
                    item.setTextAlignment(
                        Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
                    )
                self.table.setItem(row, column, item)
        self.export_button.setEnabled(report.csv is not None)
        colour = WAITING if report.cancelled or report.refused else OK
        set_message(self.message, f"{report.summary()}. Saved in {report.csv}.", colour)
        if report.predictions:
            self.table.selectRow(0)
        self.finished.emit(report)

    def _failed(self, exc: BaseException) -> bool:
        self._idle()
        message = describe_error(exc, "predicting", self.runner.errors.log_file)
        set_message(self.message, message.text, ERROR, headline="Nothing was predicted")
        return True

    def _show_selected(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        report = self.report
        if not rows or report is None or report.saliency_dir is None:
            return
        p = report.predictions[rows[0].row()]
        if not p.saliency:
            self.picture.setPixmap(QPixmap())
            self.picture.setText(p.reason or "No saliency map for this file.")
            return
        pixmap = QPixmap(str(report.saliency_dir / p.saliency))
        self.picture.setPixmap(
            pixmap.scaled(
                self.picture.size(),
                Qt.AspectRatioMode.KeepAspectRatio,
                Qt.TransformationMode.SmoothTransformation,
            )
        )
        self.picture.setToolTip(
            f"{p.file}: probability {p.probability:.3f}. Warm colours: regions that raised "
            "the score."
        )

    # -- export ----------------------------------------------------------------------------

    def _choose_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self,
            "Export the predictions",
            str(Path.home() / f"tessera-predictions-{self.version}.csv"),
            "CSV for a spreadsheet (*.csv)",
        )
        if path:
            self.export_to(Path(path))

    def export_to(self, path: Path) -> Path | None:
        """Copy the job's CSV to ``path`` (small: done at once)."""
        report = self.report
        if report is None or report.csv is None:
            return None
        try:
            shutil.copyfile(report.csv, path)
        except OSError as exc:
            set_message(self.message, f"Could not write {path}: {exc.strerror}", ERROR)
            return None
        set_message(self.message, f"Saved the predictions to {path}.", OK)
        return path
