"""The Data page's PACS receiver: switch it on or off, with AE title, port and allowed callers.

The receiver itself is ``site_client.core.intake.pacs.PacsReceiver``: it checks the settings,
listens in its own threads and imports every object it receives. Starting and stopping go
through the task runner (stopping lets transfers under way finish, which can take seconds);
while it runs, a one-second timer reads its counters for this tab and the status bar.
"""

from __future__ import annotations

from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from site_client.core.config import SiteDir
from site_client.core.intake.pacs import PacsCounts, PacsReceiver
from site_client.core.pacs_settings import (
    ALL_INTERFACES,
    LOOPBACK,
    PacsSettings,
    load_pacs_settings,
    parse_callers,
    save_pacs_settings,
)
from site_client.gui.errors import describe_error
from site_client.gui.style import ERROR, OK, set_message
from site_client.gui.tasks import Task, TaskRunner

__all__ = ["PacsPanel"]


class PacsPanel(QWidget):
    state_changed = Signal(str)  # a short line for the status bar ("" when off)
    received = Signal()  # new objects were indexed: the page reloads its view

    def __init__(self, site_dir: SiteDir, runner: TaskRunner, parent: QWidget | None = None):
        super().__init__(parent)
        self.site_dir = site_dir
        self.runner = runner
        self.receiver: PacsReceiver | None = None
        self.task: Task[object] | None = None
        self._indexed = 0
        settings = load_pacs_settings(site_dir)

        self.ae_title = QLineEdit(settings.ae_title)
        self.ae_title.setMaxLength(16)
        self.ae_title.setToolTip(
            "This site's DICOM name (AE title), up to 16 characters. Enter the same name in "
            "the PACS as the destination."
        )
        self.port = QSpinBox()
        self.port.setRange(1, 65535)
        self.port.setValue(settings.port or 11112)
        self.port.setToolTip("The network port the PACS sends to (104 or 11112 are usual).")
        self.callers = QPlainTextEdit("\n".join(settings.allowed_aes))
        self.callers.setPlaceholderText("PACS1\nCT_SCANNER_2")
        self.callers.setTabChangesFocus(True)
        self.callers.setFixedHeight(80)
        self.callers.setToolTip(
            "The AE titles allowed to send images here, one per line. Anyone else is refused."
        )
        self.host = QComboBox()
        self.host.addItem("All network connections (a PACS on another computer)", ALL_INTERFACES)
        self.host.addItem("This computer only", LOOPBACK)
        self.host.setCurrentIndex(0 if settings.host != LOOPBACK else 1)
        self.host.setToolTip("Where the receiver listens.")
        self.toggle = QPushButton("&Start receiving")
        self.toggle.setToolTip("Switch the DICOM receiver on or off.")
        self.toggle.clicked.connect(self._toggle)
        self.status = QLabel()
        self.status.setWordWrap(True)
        form_box = QGroupBox("Receive images pushed from the PACS")
        form_box.setMaximumWidth(680)
        form = QFormLayout(form_box)
        form.addRow("&AE title:", self.ae_title)
        form.addRow("&Port:", self.port)
        form.addRow("Allowed &callers:", self.callers)
        form.addRow("&Listen on:", self.host)
        form.addRow(self.toggle)
        form.addRow(self.status)
        explain = QLabel(
            "When it is on, the PACS or a modality can send studies to this computer (DICOM "
            "C-STORE). Each image is saved in the data folder and imported like a folder "
            "import. Images never leave this hospital."
        )
        explain.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addWidget(explain)
        layout.addWidget(form_box)
        layout.addStretch(1)
        self.timer = QTimer(self)
        self.timer.setInterval(1000)
        self.timer.timeout.connect(self.poll)
        self._show_off()

    @property
    def running(self) -> bool:
        return self.receiver is not None

    def settings(self) -> PacsSettings:
        return PacsSettings(
            ae_title=self.ae_title.text().strip(),
            port=self.port.value(),
            allowed_aes=parse_callers(self.callers.toPlainText()),
            host=self.host.currentData(),
        )

    def _toggle(self) -> None:
        if self.running:
            self.stop()
        else:
            self.start()

    def start(self, port: int | None = None) -> Task[object]:
        """Start with the form's settings (``port=0``: any free port, for tests)."""
        settings = self.settings()
        if port is not None:
            settings = PacsSettings(
                ae_title=settings.ae_title,
                port=port,
                allowed_aes=settings.allowed_aes,
                host=settings.host,
            )
        site_dir = self.site_dir

        def work(_ctx):
            receiver = settings.receiver(site_dir)  # checks the settings
            receiver.start()
            save_pacs_settings(site_dir, settings)
            return receiver

        self._editable(False)
        self.toggle.setEnabled(False)
        set_message(self.status, "Starting the receiver...")
        self.task = self.runner.run(
            "Starting the PACS receiver",
            work,
            on_done=self._started,
            on_failed=self._start_failed,
            owner=self,
        )
        return self.task

    def _started(self, receiver: PacsReceiver) -> None:
        self.receiver = receiver
        self._indexed = 0
        self.toggle.setText("&Stop receiving")
        self.toggle.setEnabled(True)
        self.timer.start()
        self.poll()

    def _start_failed(self, exc: BaseException) -> bool:
        message = describe_error(exc, "starting the PACS receiver", self.runner.errors.log_file)
        self._show_off()
        set_message(self.status, message.text, ERROR, headline=message.title)
        return True

    def stop(self) -> Task[object] | None:
        receiver, self.receiver = self.receiver, None
        if receiver is None:
            return None
        self.timer.stop()
        self.toggle.setEnabled(False)
        set_message(self.status, "Stopping: transfers under way may finish first...")

        def work(_ctx):
            receiver.stop()
            return receiver.counts()

        self.task = self.runner.run(
            "Stopping the PACS receiver", work, on_done=self._stopped, owner=self
        )
        return self.task

    def stop_now(self) -> None:
        """Stop on this thread (the app is closing and the event loop is ending)."""
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            self.timer.stop()
            receiver.stop(grace_seconds=3.0)
            self._show_off()

    def _stopped(self, counts: PacsCounts) -> None:
        self._show_off()
        if counts.received:
            set_message(self.status, f"The receiver is off. {self._counts_text(counts)}")
        self.received.emit()

    def _show_off(self) -> None:
        self.toggle.setText("&Start receiving")
        self.toggle.setEnabled(True)
        self._editable(True)
        set_message(self.status, "The receiver is off.")
        self.state_changed.emit("")

    def _editable(self, on: bool) -> None:
        for widget in (self.ae_title, self.port, self.callers, self.host):
            widget.setEnabled(on)

    @staticmethod
    def _counts_text(c: PacsCounts) -> str:
        return (
            f"Received {c.received} image(s): {c.indexed} imported, {c.import_rejected} not "
            f"usable, {c.pending} waiting; {c.failed} failed; {c.refused} connection(s) "
            "refused."
        )

    def poll(self) -> None:
        receiver = self.receiver
        if receiver is None:
            return
        c = receiver.counts()
        set_message(
            self.status,
            f"Receiving as {receiver.ae_title} on port {receiver.port} from "
            f"{', '.join(receiver.allowed_aes)}.\n{self._counts_text(c)}",
            OK,
            headline="On",
        )
        self.state_changed.emit(f"PACS receiver on (port {receiver.port})")
        done = c.indexed + c.import_rejected
        if done != self._indexed:
            self._indexed = done
            self.received.emit()
