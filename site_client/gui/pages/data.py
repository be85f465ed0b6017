"""The Data page: import, labels, studies, summary and the PACS receiver, as four tabs.

The page owns one thing: the :class:`~site_client.core.site_data.DataView` snapshot. It reads
it on the task runner when it opens and after anything that changed the index (an import,
a labels file, images received from the PACS) and hands it to the tabs. Reloads asked for
while one is running are folded into one more, so a busy PACS cannot queue up dozens.
"""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QTabWidget, QVBoxLayout, QWidget

from site_client.core.config import SiteDir
from site_client.core.site_data import DataView, load_data_view
from site_client.gui.pages.data_import import ImportPanel
from site_client.gui.pages.pacs import PacsPanel
from site_client.gui.pages.studies import StudiesPanel
from site_client.gui.pages.summary import SummaryPanel
from site_client.gui.tasks import Task, TaskRunner

__all__ = ["DataPage"]


class DataPage(QWidget):
    view_loaded = Signal(object)  # DataView

    def __init__(self, site_dir: SiteDir, runner: TaskRunner, parent: QWidget | None = None):
        super().__init__(parent)
        self.site_dir = site_dir
        self.runner = runner
        self.view: DataView | None = None
        self.refresh_task: Task[DataView] | None = None
        self._again = False
        self.import_panel = ImportPanel(site_dir, runner)
        self.studies = StudiesPanel(runner)
        self.summary = SummaryPanel()
        self.pacs = PacsPanel(site_dir, runner)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.import_panel, "&Import and labels")
        self.tabs.addTab(self.studies, "S&tudies")
        self.tabs.addTab(self.summary, "S&ummary")
        self.tabs.addTab(self.pacs, "&PACS receiver")
        self.tabs.setTabToolTip(0, "Bring images in from a folder and attach their labels.")
        self.tabs.setTabToolTip(1, "Every imported study, with a preview of its images.")
        self.tabs.setTabToolTip(2, "Counts of what this site holds (its scanner fingerprint).")
        self.tabs.setTabToolTip(3, "Receive images sent from the hospital's PACS.")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)
        self.import_panel.changed.connect(self.refresh)
        self.pacs.received.connect(self.refresh)

    def refresh(self) -> Task[DataView] | None:
        """Reload the view from the index (on the task runner)."""
        if self.refresh_task is not None and self.refresh_task.running:
            self._again = True
            return self.refresh_task
        site_dir, column = self.site_dir, self.import_panel.label_column.text().strip() or "label"
        self.refresh_task = self.runner.run(
            "Reading the study list",
            lambda _ctx: load_data_view(site_dir, column),
            on_done=self._loaded,
            owner=self,
        )
        return self.refresh_task

    def _loaded(self, view: DataView) -> None:
        self.view = view
        self.import_panel.show_view(view)
        self.studies.set_rows(view.studies)
        self.summary.set_summary(view.summary)
        self.view_loaded.emit(view)
        if self._again:
            self._again = False
            self.refresh()
