"""The site app's main window: a sidebar of pages and a status bar that always answers
"what is running at my site right now?".

The status bar has three parts, each bound to one source: the connection to the coordinator
(``site_client.core.status``; a coloured dot and words, with the details in its tooltip),
what the site is doing (the task runner's ``activity_changed``, with a small progress bar),
and the PACS receiver (the Data page's PACS tab). Pages are reached with the mouse, the
arrow keys in the sidebar, or Ctrl+1, Ctrl+2, ... The Governance, Models and Activity pages
read their records again each time they are shown (the participant adds offers, releases and
events to them in the background). The connection part follows the Participation page's
service; when no task of the runner is running, the activity part says what the participant
is doing.

Closing the window while the site takes part asks whether to keep taking part or stop.
"Keep taking part" minimises the window instead of closing it: training goes on and the
window is one click away in the taskbar. We do not hide to a tray icon, because many Linux
desktops (GNOME by default) show none, and a process with no window and no icon could only
be stopped with a command line, which is not honest to the people using it. "Stop and
close" stops the participant (its training process ends, the connection closes) and closes.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QCloseEvent, QGuiApplication, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QStackedWidget,
    QWidget,
)

from site_client.core.config import SiteConfig, SiteDir
from site_client.core.participation import ParticipationService, Snapshot
from site_client.core.status import Connection, connection_text
from site_client.gui.pages.activity import ActivityPage
from site_client.gui.pages.data import DataPage
from site_client.gui.pages.governance import GovernancePage
from site_client.gui.pages.models import ModelsPage
from site_client.gui.pages.participation import ParticipationPage
from site_client.gui.pages.site import SitePage
from site_client.gui.style import ERROR, IDLE, OK, WAITING, dot
from site_client.gui.tasks import Progress, Task, TaskRunner

__all__ = ["MainWindow"]

_STATE_COLOURS = {
    Connection.NOT_ENROLLED: IDLE,
    Connection.OFFLINE: IDLE,
    Connection.CONNECTING: WAITING,
    Connection.CONNECTED: OK,
    Connection.FAILED: ERROR,
}


class MainWindow(QMainWindow):
    def __init__(
        self,
        site_dir: SiteDir,
        config: SiteConfig,
        runner: TaskRunner,
        parent: QWidget | None = None,
        *,
        participation: ParticipationService | None = None,
    ) -> None:
        super().__init__(parent)
        self.site_dir = site_dir
        self.config = config
        self.runner = runner
        runner.errors.dialog_parent = self
        self.setWindowTitle(f"Tessera - {config.site_name} ({config.federation})")

        self.data_page = DataPage(site_dir, runner)
        self.governance_page = GovernancePage(site_dir, runner)
        self.participation_page = ParticipationPage(site_dir, runner, participation)
        self.models_page = ModelsPage(site_dir, runner)
        self.activity_page = ActivityPage(site_dir, runner)
        self.close_box: QMessageBox | None = None
        self.site_page = SitePage(site_dir, config)
        self.pages: list[tuple[str, QWidget, str]] = [
            ("Data", self.data_page, "Import images and labels, and see what this site holds."),
            (
                "Governance",
                self.governance_page,
                "The federation's charter, the training plans to approve or refuse, and this "
                "hospital's policy.",
            ),
            (
                "Participation",
                self.participation_page,
                "Taking part in training: the connection, the current round, what this site is "
                "doing, and how the shared model does on this hospital's images.",
            ),
            (
                "Models",
                self.models_page,
                "The models the federation released to this hospital: their model cards, how "
                "they did on this hospital's patients, accept or refuse, and predictions.",
            ),
            (
                "Activity",
                self.activity_page,
                "Everything this site did and signed, newest first; export it for your records.",
            ),
            ("This site", self.site_page, "This site's identity and the coordinator it trusts."),
        ]
        self.sidebar = QListWidget()
        self.sidebar.setToolTip("Pages (Ctrl+1, Ctrl+2, ...)")
        self.stack = QStackedWidget()
        for i, (title, page, tip) in enumerate(self.pages):
            item = QListWidgetItem(title)
            item.setToolTip(f"{tip} (Ctrl+{i + 1})")
            self.sidebar.addItem(item)
            self.stack.addWidget(page)
            QShortcut(QKeySequence(f"Ctrl+{i + 1}"), self, activated=lambda i=i: self.show_page(i))
        self.sidebar.currentRowChanged.connect(self._page_changed)
        self.sidebar.setFixedWidth(170)
        self.sidebar.setSpacing(3)
        font = self.sidebar.font()
        font.setPointSizeF(font.pointSizeF() * 1.15)
        self.sidebar.setFont(font)
        central = QWidget()
        layout = QHBoxLayout(central)
        layout.addWidget(self.sidebar)
        layout.addWidget(self.stack, 1)
        self.setCentralWidget(central)

        # -- status bar --------------------------------------------------------------------
        self.connection_dot = QLabel()
        self.connection_label = QLabel()
        self.activity_label = QLabel()
        self.activity_label.setToolTip("What Tessera is doing at this site right now.")
        self.activity_bar = QProgressBar()
        self.activity_bar.setMaximumWidth(160)
        self.activity_bar.setTextVisible(False)
        self.activity_bar.hide()
        self.pacs_label = QLabel()
        self.pacs_label.setToolTip("The DICOM receiver for images pushed from the PACS.")
        bar = self.statusBar()
        bar.addWidget(self.connection_dot)
        bar.addWidget(self.connection_label)
        bar.addWidget(QLabel("|"))
        bar.addWidget(self.activity_label, 1)
        bar.addPermanentWidget(self.pacs_label)
        bar.addPermanentWidget(self.activity_bar)
        runner.activity_changed.connect(self._activity)
        runner.started.connect(self._task_started)
        self.data_page.pacs.state_changed.connect(self._pacs)
        self.set_connection(Connection.OFFLINE)
        self.participation_page.connection_changed.connect(self.set_connection)
        self.participation_page.snapshot_changed.connect(
            self._participation, Qt.ConnectionType.QueuedConnection
        )
        self._activity(runner.activity())
        self._pacs("")

        self.sidebar.setCurrentRow(0)
        self.resize(1180, 760)
        self.data_page.refresh()

    def show_page(self, i: int) -> None:
        self.sidebar.setCurrentRow(i)
        self.sidebar.setFocus()

    def _page_changed(self, i: int) -> None:
        self.stack.setCurrentIndex(i)
        page = self.stack.widget(i)
        if page in (self.governance_page, self.models_page, self.activity_page):
            page.refresh()

    def set_connection(self, state: Connection) -> None:
        text, tip = connection_text(state, self.config.coordinator_url)
        self.connection_state = state
        self.connection_dot.setPixmap(dot(_STATE_COLOURS[state]))
        self.connection_label.setText(text)
        # never squeezed by a long activity text beside it
        self.connection_label.setMinimumWidth(self.connection_label.sizeHint().width())
        for label in (self.connection_dot, self.connection_label):
            label.setToolTip(tip)

    def _participation(self, _snap: Snapshot) -> None:
        if not self.runner.active():
            self._activity("")

    def _activity(self, text: str) -> None:
        snap = self.participation_page.snapshot
        if not text and snap.active:
            self.activity_label.setText(snap.doing_text)
            self.activity_bar.hide()
            return
        self.activity_label.setText(text or "Nothing running")
        busy = bool(text)
        self.activity_bar.setVisible(busy)
        task = self.runner.active()[-1] if self.runner.active() else None
        p = task.last_progress if task is not None else None
        if p is not None and p.total:
            self.activity_bar.setRange(0, p.total)
            self.activity_bar.setValue(p.done)
        else:
            self.activity_bar.setRange(0, 0)

    def _task_started(self, task: Task[object]) -> None:
        task.progressed.connect(self._progressed)

    def _progressed(self, _p: Progress) -> None:
        self._activity(self.runner.activity())

    def _pacs(self, text: str) -> None:
        self.pacs_label.setText(text or "PACS receiver off")

    def ask_close(self) -> str:
        """While the site takes part: "background" (minimise, keep taking part), "stop" (stop
        and close) or "cancel". Blocks in the dialog's own event loop (the app keeps running)."""
        box = QMessageBox(
            QMessageBox.Icon.Question,
            "Keep taking part in training?",
            "This site is taking part in training. Keep taking part with the window "
            "minimised (it stays in the taskbar), or stop taking part and close Tessera?\n\n"
            "If you stop, the other sites carry on without this hospital until you start "
            "again.",
            QMessageBox.StandardButton.NoButton,
            self,
        )
        keep = box.addButton("&Keep taking part", QMessageBox.ButtonRole.AcceptRole)
        stop = box.addButton("&Stop and close", QMessageBox.ButtonRole.DestructiveRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(keep)
        self.close_box = box
        box.exec()
        self.close_box = None
        clicked = box.clickedButton()
        return "background" if clicked is keep else "stop" if clicked is stop else "cancel"

    def closeEvent(self, event: QCloseEvent) -> None:
        """Ask first while a run is active; then stop the participant, the receiver and the
        background work before the window goes."""
        service = self.participation_page.service
        if service.running:
            choice = self.ask_close()
            if choice != "stop":
                event.ignore()
                if choice == "background":
                    self.showMinimized()
                return
            QGuiApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)
            try:
                service.stop()
            finally:
                QGuiApplication.restoreOverrideCursor()
        self.data_page.pacs.stop_now()
        self.runner.shutdown(timeout_s=10.0)
        self.runner.errors.close_dialogs()
        event.accept()
