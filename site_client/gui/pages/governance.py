"""The Governance page: the charter, the training plans, the site policy and the history of
what people here accepted and decided, as four tabs.

The page owns one thing: the :class:`~site_client.core.governance_view.GovernanceView`
snapshot, read on the task runner when the page is shown and after every decision, and handed
to the tabs. The name of the person deciding is asked once, at the top, and signed with each
acceptance and decision. The coordinator's offers are recorded by the participant in the
background; showing the page again reads them. Reloads asked for while one is running are
folded into one more.
"""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QTabWidget,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from site_client.core.activity import ActivityEntry
from site_client.core.config import SiteDir
from site_client.core.governance_view import GovernanceView, load_governance_view
from site_client.gui.pages.governance_charter import CharterPanel
from site_client.gui.pages.governance_plans import PlansPanel
from site_client.gui.pages.governance_policy import PolicyPanel
from site_client.gui.tasks import Task, TaskRunner

__all__ = ["GovernancePage", "HistoryPanel"]


class HistoryPanel(QWidget):
    """Acceptances, decisions and policy changes, newest first."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.caption = QLabel()
        self.caption.setWordWrap(True)
        self.tree = QTreeWidget()
        self.tree.setColumnCount(3)
        self.tree.setHeaderLabels(["When", "Who", "What"])
        self.tree.setRootIsDecorated(False)
        self.tree.setAlternatingRowColors(True)
        self.tree.setColumnWidth(0, 140)
        self.tree.setColumnWidth(1, 170)
        self.tree.setToolTip(
            "Every acceptance and decision is signed with the site key; the full timeline is "
            "on the Activity page."
        )
        layout = QVBoxLayout(self)
        layout.addWidget(self.caption)
        layout.addWidget(self.tree, 1)

    def show_entries(self, entries: tuple[ActivityEntry, ...]) -> None:
        self.tree.clear()
        for entry in entries:
            item = QTreeWidgetItem(
                [f"{entry.when():%d %b %Y %H:%M}", entry.person or "-", entry.text]
            )
            item.setToolTip(2, entry.text + (" (signed with the site key)" if entry.signed else ""))
            self.tree.addTopLevelItem(item)
        n = len(entries)
        self.caption.setText(
            "Nothing has been accepted or decided here yet."
            if not n
            else f"{n} {'entry' if n == 1 else 'entries'}, newest first. Acceptances and "
            "decisions are signed with the site key."
        )


class GovernancePage(QWidget):
    view_loaded = Signal(object)  # GovernanceView

    def __init__(self, site_dir: SiteDir, runner: TaskRunner, parent: QWidget | None = None):
        super().__init__(parent)
        self.site_dir = site_dir
        self.runner = runner
        self.view: GovernanceView | None = None
        self.refresh_task: Task[GovernanceView] | None = None
        self._again = False

        self.name = QLineEdit()
        self.name.setPlaceholderText("e.g. Dr. Ada Byron, Head of Radiology")
        self.name.setToolTip(
            "The person accepting or deciding. The name is signed with the decision and "
            "shown to the consortium lead and to auditors."
        )
        name_label = QLabel("Your &name:")
        name_label.setBuddy(self.name)
        top = QHBoxLayout()
        top.addWidget(name_label)
        top.addWidget(self.name, 1)
        top.addWidget(QLabel("(signed with what you accept or decide)"))

        self.charter = CharterPanel(site_dir, runner, self.name)
        self.plans = PlansPanel(site_dir, runner, self.name)
        self.policy = PolicyPanel(site_dir, runner)
        self.history = HistoryPanel()
        self.tabs = QTabWidget()
        self.tabs.addTab(self.charter, "C&harter")
        self.tabs.addTab(self.plans, "Training &plans")
        self.tabs.addTab(self.policy, "Site p&olicy")
        self.tabs.addTab(self.history, "Histor&y")
        self.tabs.setTabToolTip(0, "The federation's terms, which this hospital accepts.")
        self.tabs.setTabToolTip(1, "What each training run would do, to approve or refuse.")
        self.tabs.setTabToolTip(2, "The floor this hospital sets for every plan.")
        self.tabs.setTabToolTip(3, "What people here accepted and decided, newest first.")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.tabs, 1)
        for panel in (self.charter, self.plans, self.policy):
            panel.changed.connect(self.refresh)

    def refresh(self) -> Task[GovernanceView] | None:
        """Reload the view from the governance record (on the task runner)."""
        if self.refresh_task is not None and self.refresh_task.running:
            self._again = True
            return self.refresh_task
        site_dir = self.site_dir
        self.refresh_task = self.runner.run(
            "Reading the charter and plans",
            lambda _ctx: load_governance_view(site_dir),
            on_done=self._loaded,
            owner=self,
        )
        return self.refresh_task

    def _loaded(self, view: GovernanceView) -> None:
        self.view = view
        self.charter.show_view(view)
        self.plans.show_view(view)
        self.policy.show_view(view)
        self.history.show_entries(view.history)
        pending = sum(p.record.decision == "pending" for p in view.plans)
        plans = f"Training &plans ({pending} to decide)" if pending else "Training &plans"
        self.tabs.setTabText(1, plans)
        self.view_loaded.emit(view)
        if self._again:
            self._again = False
            self.refresh()
