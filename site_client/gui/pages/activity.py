"""The Activity page: everything this site was offered, decided, signed, checked and imported,
newest first, grouped by day, and exportable to CSV or JSON.

A thin view over ``site_client.core.activity``: the timeline is read on the task runner when
the page is shown (the participant adds to it in the background), each entry is one sentence
with its time and whether it was signed with the site key, and the export writes exactly the
entries shown, on the task runner, to a file the person chooses.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from site_client.core.activity import ActivityEntry, export_activity, load_activity
from site_client.core.config import SiteDir
from site_client.gui.errors import describe_error
from site_client.gui.style import ERROR, OK, set_message
from site_client.gui.tasks import Task, TaskRunner

__all__ = ["ActivityPage"]

CSV_FILTER = "CSV for a spreadsheet (*.csv)"
JSON_FILTER = "JSON (*.json)"


def _day(day: date) -> str:
    return f"{day:%A %d %B %Y}"


class ActivityPage(QWidget):
    loaded = Signal(object)  # tuple[ActivityEntry, ...]
    exported = Signal(object)  # Path

    def __init__(self, site_dir: SiteDir, runner: TaskRunner, parent: QWidget | None = None):
        super().__init__(parent)
        self.site_dir = site_dir
        self.runner = runner
        self.entries: tuple[ActivityEntry, ...] = ()
        self.refresh_task: Task[tuple[ActivityEntry, ...]] | None = None
        self.export_task: Task[Path] | None = None
        self._again = False

        self.caption = QLabel(
            "Everything this site was offered, decided, signed and imported, newest first. "
            "Nothing here leaves this computer unless you export it."
        )
        self.caption.setWordWrap(True)
        self.tree = QTreeWidget()
        self.tree.setColumnCount(3)
        self.tree.setHeaderLabels(["Time", "What happened", "Signed"])
        self.tree.setAlternatingRowColors(True)
        header = self.tree.header()
        header.setStretchLastSection(False)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Interactive)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        self.tree.setColumnWidth(0, 90)
        self.tree.setToolTip(
            "Signed: the entry records a decision signed with this site's key, which the "
            "coordinator and auditors can check."
        )
        self.refresh_button = QPushButton("&Refresh")
        self.refresh_button.setToolTip("Read the timeline again.")
        self.refresh_button.clicked.connect(self.refresh)
        self.export_button = QPushButton("&Export...")
        self.export_button.setToolTip(
            "Save the timeline as a CSV file (for a spreadsheet) or a JSON file, for the "
            "hospital's own records."
        )
        self.export_button.clicked.connect(self.choose_export)
        self.message = QLabel()
        self.message.setWordWrap(True)
        buttons = QHBoxLayout()
        buttons.addWidget(self.refresh_button)
        buttons.addWidget(self.export_button)
        buttons.addWidget(self.message, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(self.caption)
        layout.addWidget(self.tree, 1)
        layout.addLayout(buttons)
        self.export_button.setEnabled(False)

    def refresh(self) -> Task[tuple[ActivityEntry, ...]] | None:
        if self.refresh_task is not None and self.refresh_task.running:
            self._again = True
            return self.refresh_task
        site_dir = self.site_dir
        self.refresh_task = self.runner.run(
            "Reading the activity timeline",
            lambda _ctx: load_activity(site_dir),
            on_done=self._loaded,
            owner=self,
        )
        return self.refresh_task

    def _loaded(self, entries: tuple[ActivityEntry, ...]) -> None:
        self.entries = entries
        self.tree.clear()
        days: dict[date, QTreeWidgetItem] = {}
        bold = QFont(self.tree.font())
        bold.setBold(True)
        for entry in entries:
            when = entry.when()
            parent = days.get(when.date())
            if parent is None:
                parent = QTreeWidgetItem([_day(when.date())])
                parent.setFont(0, bold)
                self.tree.addTopLevelItem(parent)
                parent.setFirstColumnSpanned(True)
                days[when.date()] = parent
            item = QTreeWidgetItem(
                [f"{when:%H:%M}", entry.text, "yes, with the site key" if entry.signed else ""]
            )
            item.setToolTip(1, entry.text)
            parent.addChild(item)
        self.tree.expandAll()
        self.export_button.setEnabled(bool(entries))
        if not entries:
            set_message(self.message, "Nothing has happened at this site yet.")
        self.loaded.emit(entries)
        if self._again:
            self._again = False
            self.refresh()

    def lines(self) -> list[str]:
        """What the tree shows, one "14:02 Dr. Ada Byron approved ..." line per entry."""
        out: list[str] = []
        for i in range(self.tree.topLevelItemCount()):
            day = self.tree.topLevelItem(i)
            children = [day.child(j) for j in range(day.childCount())] if day else []
            out.extend(f"{c.text(0)} {c.text(1)}" for c in children if c is not None)
        return out

    # -- export ----------------------------------------------------------------------------

    def choose_export(self) -> None:
        path, chosen = QFileDialog.getSaveFileName(
            self,
            "Export the activity timeline",
            str(Path.home() / "tessera-activity.csv"),
            f"{CSV_FILTER};;{JSON_FILTER}",
        )
        if not path:
            return
        target = Path(path)
        if not target.suffix:
            target = target.with_suffix(".json" if chosen == JSON_FILTER else ".csv")
        self.export_to(target)

    def export_to(self, path: Path) -> Task[Path]:
        entries = self.entries
        set_message(self.message, f"Writing {path.name}...")
        self.export_button.setEnabled(False)
        self.export_task = self.runner.run(
            "Exporting the activity timeline",
            lambda _ctx: export_activity(entries, path),
            on_done=lambda written: self._exported(written, len(entries)),
            on_failed=self._export_failed,
            owner=self,
        )
        return self.export_task

    def _exported(self, path: Path, count: int) -> None:
        self.export_button.setEnabled(bool(self.entries))
        set_message(self.message, f"Saved {count} entries to {path}.", OK)
        self.exported.emit(path)

    def _export_failed(self, exc: BaseException) -> bool:
        self.export_button.setEnabled(bool(self.entries))
        message = describe_error(exc, "exporting the timeline", self.runner.errors.log_file)
        set_message(self.message, message.text, ERROR, headline="Nothing was exported")
        return True
