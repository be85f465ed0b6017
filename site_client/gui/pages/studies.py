"""The Data page's study table, with filter and sort, and an image preview with windowing.

The table is a ``QSortFilterProxyModel`` over a ``QAbstractTableModel`` of the core's
``StudyRow``s; the filter rule is the core's ``StudyFilter``. Selecting a study loads one of
its images on the task runner (``site_client.core.preview``); moving the window controls only
re-renders the screen-sized copy, so it follows the mouse without a pause.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PySide6.QtCore import QItemSelection, QModelIndex, Qt, Signal
from PySide6.QtGui import QImage, QKeySequence, QPixmap, QShortcut
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from site_client.core.preview import PreviewImage, load_preview, render
from site_client.core.studies import LabelChoice, StudyFilter, StudyRow
from site_client.gui.errors import describe_error
from site_client.gui.models import STUDY_COLUMNS, StudyFilterProxy, StudyTableModel
from site_client.gui.style import ERROR, set_message
from site_client.gui.tasks import Task, TaskRunner

__all__ = ["StudiesPanel"]

LABEL_CHOICES = (
    ("Any label", LabelChoice.ANY),
    ("Label 1", LabelChoice.POSITIVE),
    ("Label 0", LabelChoice.NEGATIVE),
    ("No label yet", LabelChoice.NONE),
)


class PreviewPane(QGroupBox):
    """One image of the selected study and its window (centre and width)."""

    rendered = Signal()

    def __init__(self, runner: TaskRunner, parent: QWidget | None = None) -> None:
        super().__init__("Image preview", parent)
        self.runner = runner
        self.preview: PreviewImage | None = None
        self.pixels: np.ndarray | None = None  # the last rendering (8-bit grey)
        self.task: Task[PreviewImage] | None = None
        self._wanted = ""
        self.image = QLabel("Select a study to see one of its images.")
        self.image.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.image.setMinimumSize(280, 280)
        self.image.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.center = QDoubleSpinBox()
        self.width_box = QDoubleSpinBox()
        for box in (self.center, self.width_box):
            box.setDecimals(1)
            box.setKeyboardTracking(False)
            box.setRange(-1e6, 1e6)
            box.valueChanged.connect(self._render)
        self.width_box.setMinimum(1.0)
        self.center.setToolTip(
            "Window centre (level): the pixel value shown as mid-grey, in the image's own "
            "units (Hounsfield units for CT)."
        )
        self.width_box.setToolTip(
            "Window width: the range of values spread from black to white. Smaller means "
            "more contrast."
        )
        self.reset = QPushButton("&Reset window")
        self.reset.setToolTip("Back to the window stored in the image file.")
        self.reset.clicked.connect(self.reset_window)
        self.info = QLabel()
        self.info.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Window &centre:", self.center)
        form.addRow("Window &width:", self.width_box)
        controls = QHBoxLayout()
        controls.addLayout(form)
        controls.addWidget(self.reset, 0, Qt.AlignmentFlag.AlignBottom)
        layout = QVBoxLayout(self)
        layout.addWidget(self.image, 1)
        layout.addLayout(controls)
        layout.addWidget(self.info)
        self._enable(False)

    def _enable(self, on: bool) -> None:
        for widget in (self.center, self.width_box, self.reset):
            widget.setEnabled(on)

    def show_study(self, row: StudyRow | None) -> None:
        if row is None:
            self.preview = None
            self.pixels = None
            self._wanted = ""
            self.image.setPixmap(QPixmap())
            self.image.setText("Select a study to see one of its images.")
            self.info.clear()
            self._enable(False)
            return
        self._wanted = row.preview_path
        path = row.preview_path
        self.info.setText(f"Loading an image of study {row.key}...")
        self.task = self.runner.run(
            "Loading an image",
            lambda _ctx: load_preview(path),
            on_done=lambda preview: self._loaded(path, row, preview),
            on_failed=lambda exc: self._failed(path, exc),
            owner=self,
        )

    def _loaded(self, path: str, row: StudyRow, preview: PreviewImage) -> None:
        if path != self._wanted:
            return  # another study was selected meanwhile
        self.preview = preview
        frames = f", frame 1 of {preview.frames}" if preview.frames > 1 else ""
        self.info.setText(
            f"Study {row.key}: {preview.modality or 'image'}, {preview.rows} x "
            f"{preview.columns} pixels{frames}, {preview.photometric}."
        )
        span = max(preview.value_max - preview.value_min, 1.0)
        for box in (self.center, self.width_box):
            box.blockSignals(True)
        self.center.setRange(preview.value_min - span, preview.value_max + span)
        self.width_box.setRange(1.0, max(span * 4, preview.default_width * 2, 2.0))
        step = max(span / 100.0, 0.1)
        self.center.setSingleStep(step)
        self.width_box.setSingleStep(step)
        for box in (self.center, self.width_box):
            box.blockSignals(False)
        self._enable(True)
        self.reset_window()

    def _failed(self, path: str, exc: BaseException) -> bool:
        if path != self._wanted:
            return True
        message = describe_error(exc, "loading an image", self.runner.errors.log_file)
        self.preview = None
        self.pixels = None
        self.image.setPixmap(QPixmap())
        set_message(self.image, message.text, ERROR, headline=message.title)
        self.image.setWordWrap(True)
        self._enable(False)
        return True

    def reset_window(self) -> None:
        if self.preview is None:
            return
        self.set_window(self.preview.default_center, self.preview.default_width)

    def set_window(self, center: float, width: float) -> None:
        for box in (self.center, self.width_box):
            box.blockSignals(True)
        self.center.setValue(center)
        self.width_box.setValue(width)
        for box in (self.center, self.width_box):
            box.blockSignals(False)
        self._render()

    def _render(self) -> None:
        if self.preview is None:
            return
        pixels = render(self.preview, self.center.value(), self.width_box.value())
        self.pixels = pixels
        h, w = pixels.shape
        image = QImage(pixels.data, w, h, w, QImage.Format.Format_Grayscale8).copy()
        pixmap = QPixmap.fromImage(image)
        size = self.image.contentsRect().size()
        if size.width() > 10 and size.height() > 10:
            pixmap = pixmap.scaled(
                size,
                Qt.AspectRatioMode.KeepAspectRatio,
                Qt.TransformationMode.SmoothTransformation,
            )
        self.image.setPixmap(pixmap)
        self.rendered.emit()


class StudiesPanel(QWidget):
    def __init__(self, runner: TaskRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = StudyTableModel(self)
        self.proxy = StudyFilterProxy(self)
        self.proxy.setSourceModel(self.model)
        self.filter_edit = QLineEdit()
        self.filter_edit.setPlaceholderText(
            "Filter: type part of a study code, modality, scanner..."
        )
        self.filter_edit.setToolTip(
            "Shows only the studies whose row contains every word typed here (Ctrl+F)."
        )
        self.filter_edit.setClearButtonEnabled(True)
        self.label_choice = QComboBox()
        for text, choice in LABEL_CHOICES:
            self.label_choice.addItem(text, choice)
        self.label_choice.setToolTip("Show studies with this label only.")
        self.count = QLabel()
        self.filter_edit.textChanged.connect(self._filter_changed)
        self.label_choice.currentIndexChanged.connect(self._filter_changed)
        QShortcut(QKeySequence.StandardKey.Find, self, activated=self.filter_edit.setFocus)

        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setAlternatingRowColors(True)
        self.table.setWordWrap(False)
        self.table.verticalHeader().hide()
        self.table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 8)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setToolTip("Click a column title to sort; select a study to preview it.")
        self.table.selectionModel().selectionChanged.connect(self._selection_changed)

        self.preview = PreviewPane(runner)
        filters = QHBoxLayout()
        find = QLabel("&Find:")
        find.setBuddy(self.filter_edit)
        filters.addWidget(find)
        filters.addWidget(self.filter_edit, 1)
        filters.addWidget(self.label_choice)
        left = QWidget()
        lbox = QVBoxLayout(left)
        lbox.setContentsMargins(0, 0, 0, 0)
        lbox.addLayout(filters)
        lbox.addWidget(self.table, 1)
        lbox.addWidget(self.count)
        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(self.preview)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)
        self._update_count()

    def set_rows(self, rows: Sequence[StudyRow]) -> None:
        selected = self.selected()
        first = self.model.rowCount() == 0
        self.model.set_rows(rows)
        if first and rows:
            self._fit_columns(rows)
        if selected is not None:
            for proxy_row in range(self.proxy.rowCount()):
                if self.proxy.row_at(proxy_row).study_uid == selected.study_uid:
                    self.table.selectRow(proxy_row)
                    break
        self._update_count()

    def _fit_columns(self, rows: Sequence[StudyRow], sample: int = 50) -> None:
        """Column widths from the titles and the first rows. Qt's resizeColumnsToContents
        measures every cell through Python, which holds the window still for most of a
        second with thousands of studies (benchmarks/gui_latency.py)."""
        metrics = self.table.fontMetrics()
        texts = [r.texts() for r in rows[:sample]]
        for column, (title, _) in enumerate(STUDY_COLUMNS):
            widest = max(metrics.horizontalAdvance(t) for t in [title, *(r[column] for r in texts)])
            self.table.setColumnWidth(column, widest + 24)

    def set_filter(self, text: str, label: LabelChoice = LabelChoice.ANY) -> None:
        self.filter_edit.setText(text)
        self.label_choice.setCurrentIndex(
            next(i for i, (_, c) in enumerate(LABEL_CHOICES) if c is label)
        )

    def selected(self) -> StudyRow | None:
        rows = self.table.selectionModel().selectedRows()
        return self.proxy.row_at(rows[0].row()) if rows else None

    def visible_rows(self) -> list[StudyRow]:
        return [self.proxy.row_at(i) for i in range(self.proxy.rowCount())]

    def _filter_changed(self) -> None:
        choice = self.label_choice.currentData()
        self.proxy.set_filter(StudyFilter(self.filter_edit.text(), choice or LabelChoice.ANY))
        self._update_count()

    def _update_count(self) -> None:
        shown, total = self.proxy.rowCount(), self.model.rowCount()
        if total == 0:
            self.count.setText("No studies yet: import a folder of images first.")
        elif shown == total:
            self.count.setText(f"{total} studies.")
        else:
            self.count.setText(f"Showing {shown} of {total} studies.")

    def _selection_changed(self, _selected: QItemSelection, _deselected: QItemSelection) -> None:
        row = self.selected()
        current = self.preview._wanted
        if row is None or row.preview_path != current:
            self.preview.show_study(row)

    def select_first(self) -> None:
        if self.proxy.rowCount():
            self.table.selectRow(0)
            self.table.scrollTo(self.proxy.index(0, 0, QModelIndex()))
