"""Qt item models over the core's plain rows: the study table and the list of unusable files.

The models only adapt: ``StudyRow.texts()`` is what a cell shows, ``StudyFilter.accepts`` is
the filter (in ``site_client.core.studies``), and sorting (done by the table model, one keyed
sort) uses the values :data:`SORT_ROLE` gives, numbers for counts and sizes so that 10 sorts
after 9.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QModelIndex,
    QPersistentModelIndex,
    QSortFilterProxyModel,
    Qt,
)

from site_client.core.intake.index import Rejection
from site_client.core.studies import StudyFilter, StudyRow

__all__ = ["SORT_ROLE", "RejectionTableModel", "StudyFilterProxy", "StudyTableModel"]

SORT_ROLE = Qt.ItemDataRole.UserRole + 1
ROW_ROLE = Qt.ItemDataRole.UserRole + 2

Index = QModelIndex | QPersistentModelIndex

STUDY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Study", "A short code for the study (not the patient); the labels report uses it too."),
    ("Modality", "The kind of image, as the scanner wrote it (DX, CR, CT, MR...)."),
    ("Body part", "The body part examined, as the scanner wrote it."),
    ("Scanner", "Manufacturer and model of the machine that made the images."),
    ("Series", "How many series the study has."),
    ("Images", "How many images of the study were imported."),
    ("Image size", "Rows x columns of the largest image, in pixels."),
    ("Label", "The label loaded from the labels file, or '(no label)'."),
)


def _sort_value(row: StudyRow, column: int) -> Any:
    if column == 4:
        return row.series
    if column == 5:
        return row.images
    if column == 6:
        return row.rows * row.columns
    if column == 7:  # labelled studies first, by value
        return (0, row.label) if row.label else (1, "")
    return row.texts()[column].casefold()


class StudyTableModel(QAbstractTableModel):
    """The studies, kept in the table's sort order: sorting here is one Python ``sorted``
    with a key, where a proxy's ``lessThan`` would call back into Python for every
    comparison (tens of thousands for a few thousand studies, felt as a frozen window)."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self._rows: tuple[StudyRow, ...] = ()
        self._order: tuple[int, Qt.SortOrder] | None = None

    def _sorted(self, rows: Sequence[StudyRow]) -> tuple[StudyRow, ...]:
        if self._order is None:
            return tuple(rows)
        column, order = self._order
        return tuple(
            sorted(
                rows,
                key=lambda r: (_sort_value(r, column), r.key),  # ties: by study key
                reverse=order == Qt.SortOrder.DescendingOrder,
            )
        )

    def set_rows(self, rows: Sequence[StudyRow]) -> None:
        self.beginResetModel()
        self._rows = self._sorted(rows)
        self.endResetModel()

    def sort(self, column: int, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        if not 0 <= column < len(STUDY_COLUMNS):
            return
        self.layoutAboutToBeChanged.emit()
        self._order = (column, order)
        before = self.persistentIndexList()
        held = [self._rows[i.row()] for i in before]
        self._rows = self._sorted(self._rows)
        where = {id(r): n for n, r in enumerate(self._rows)}
        after = [self.index(where[id(r)], i.column()) for r, i in zip(held, before, strict=True)]
        self.changePersistentIndexList(before, after)
        self.layoutChanged.emit()

    def row_at(self, row: int) -> StudyRow:
        return self._rows[row]

    def rowCount(self, parent: Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._rows)

    def columnCount(self, parent: Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(STUDY_COLUMNS)

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        row = self._rows[index.row()]
        column = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            return row.texts()[column]
        if role == SORT_ROLE:
            return _sort_value(row, column)
        if role == ROW_ROLE:
            return row
        if role == Qt.ItemDataRole.TextAlignmentRole and column in (4, 5):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ToolTipRole and column == 0:
            return f"Study {row.key}: {row.images} image(s) in {row.series} series"
        return None

    def headerData(
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if orientation != Qt.Orientation.Horizontal or not 0 <= section < len(STUDY_COLUMNS):
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            return STUDY_COLUMNS[section][0]
        if role == Qt.ItemDataRole.ToolTipRole:
            return STUDY_COLUMNS[section][1]
        return None


class StudyFilterProxy(QSortFilterProxyModel):
    """Filtering by a core :class:`StudyFilter`; sorting is the source model's (the proxy
    keeps its order), which the view asks for through :meth:`sort`."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self._filter = StudyFilter()

    @property
    def study_filter(self) -> StudyFilter:
        return self._filter

    def set_filter(self, study_filter: StudyFilter) -> None:
        self.beginFilterChange()
        self._filter = study_filter
        self.endFilterChange()

    def filterAcceptsRow(self, source_row: int, source_parent: Index) -> bool:
        model = self.sourceModel()
        if not isinstance(model, StudyTableModel):
            return True
        return self._filter.accepts(model.row_at(source_row))

    def sort(self, column: int, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        model = self.sourceModel()
        if isinstance(model, StudyTableModel):
            model.sort(column, order)

    def row_at(self, proxy_row: int) -> StudyRow:
        return self.index(proxy_row, 0).data(ROW_ROLE)


REJECTION_COLUMNS = ("File", "Why it cannot be used", "Code")


class RejectionTableModel(QAbstractTableModel):
    """The files that could not be used, with the reason in plain words."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self._rows: tuple[Rejection, ...] = ()

    def set_rows(self, rows: Sequence[Rejection]) -> None:
        self.beginResetModel()
        self._rows = tuple(rows)
        self.endResetModel()

    def rowCount(self, parent: Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._rows)

    def columnCount(self, parent: Index = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(REJECTION_COLUMNS)

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        r = self._rows[index.row()]
        if role in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.ToolTipRole):
            return (r.path, r.reason, r.code)[index.column()]
        return None

    def headerData(
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if (
            role == Qt.ItemDataRole.DisplayRole
            and orientation == Qt.Orientation.Horizontal
            and 0 <= section < len(REJECTION_COLUMNS)
        ):
            return REJECTION_COLUMNS[section]
        return None
