"""The first-run wizard: where Tessera keeps its data, the invitation code, enrolment.

Three pages, each a thin view over ``site_client.core.onboarding``:

1. *Data folder*: checked as it is typed (``check_data_folder``); a folder that already holds
   an enrolled site ends the wizard at once, since that site only needs opening.
2. *Invitation*: the code is decoded and its expiry checked as it is pasted, before anything
   is sent; the coordinator's address and certificate fingerprint are shown for the person to
   compare with what the consortium lead told them, and Next stays off until they confirm.
3. *Enrol*: the site key is made and the code redeemed on the task runner; a used, expired or
   unknown code, or a coordinator that cannot be reached, is explained on the page with what
   to do next, and "Try again" repeats the attempt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from PySide6.QtCore import QStandardPaths, Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
    QWizard,
    QWizardPage,
)

from site_client.core.config import SiteConfig, SiteDir
from site_client.core.onboarding import (
    FolderCheck,
    InvitationCheck,
    check_data_folder,
    check_invitation,
    enrol_site,
    format_fingerprint,
    time_left,
)
from site_client.gui.errors import describe_error
from site_client.gui.style import ERROR, OK, WAITING, set_message
from site_client.gui.tasks import Task, TaskRunner

__all__ = ["FirstRunWizard", "default_data_folder"]

FOLDER_PAGE, INVITATION_PAGE, ENROL_PAGE = range(3)


def default_data_folder() -> Path:
    """Where the app suggests keeping the site's data: the user's application data folder."""
    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppLocalDataLocation)
    return Path(base or Path.home() / ".tessera") / "site"


def _wrapping(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    return label


class FolderPage(QWizardPage):
    def __init__(self, initial: Path | None) -> None:
        super().__init__()
        self.setTitle("Where should Tessera keep this site's data?")
        self.setSubTitle(
            "Tessera keeps this site's key, settings and list of imported images in one folder "
            "on this computer. Images are not copied there, and nothing in it is sent anywhere."
        )
        self.check: FolderCheck = check_data_folder("")
        self.folder = QLineEdit(str(initial or default_data_folder()))
        self.folder.setToolTip("The full path of the folder; it is created if it does not exist.")
        browse = QPushButton("&Browse...")
        browse.setToolTip("Choose the folder in a file dialog.")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.folder, 1)
        row.addWidget(browse)
        self.status = _wrapping()
        label = QLabel("&Data folder:")
        label.setBuddy(self.folder)
        layout = QVBoxLayout(self)
        layout.addWidget(label)
        layout.addLayout(row)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.folder.textChanged.connect(self._changed)
        self._changed()

    def _browse(self) -> None:
        chosen = QFileDialog.getExistingDirectory(
            self, "Choose the data folder", self.folder.text()
        )
        if chosen:
            self.folder.setText(chosen)

    def _changed(self) -> None:
        self.check = check_data_folder(self.folder.text())
        colour = OK if self.check.usable else ERROR
        set_message(self.status, self.check.message, colour)
        self.setFinalPage(self.check.enrolled is not None)
        self.completeChanged.emit()

    def isComplete(self) -> bool:
        return self.check.usable

    def nextId(self) -> int:
        return -1 if self.check.enrolled is not None else INVITATION_PAGE


class InvitationPage(QWizardPage):
    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__()
        self.clock = clock
        self.setTitle("Paste your invitation code")
        self.setSubTitle(
            "The consortium lead sent this site a one-time code starting with TESSERA-1-. "
            "Tessera checks it here before contacting anyone."
        )
        self.code = QPlainTextEdit()
        self.code.setPlaceholderText("TESSERA-1-...")
        self.code.setToolTip("Paste the whole code; line breaks and dashes do not matter.")
        self.code.setTabChangesFocus(True)
        self.code.setFixedHeight(90)
        self.site_name = QLineEdit()
        self.site_name.setPlaceholderText("for example: St Mary's Radiology")
        self.site_name.setToolTip(
            "How the consortium lead and the other hospitals will see this site (optional)."
        )
        self.federation = _wrapping()
        self.address = _wrapping()
        for label in (self.federation, self.address):
            label.setTextFormat(Qt.TextFormat.PlainText)  # they come from the code
        self.fingerprint = _wrapping()
        self.fingerprint.setToolTip(
            "The SHA-256 fingerprint of the coordinator's certificate. Tessera will only talk "
            "to a coordinator that presents exactly this certificate."
        )
        self.expiry = _wrapping()
        self.problem = _wrapping()
        self.confirm = QCheckBox(
            "The address and fingerprint match what the consortium lead gave me"
        )
        self.confirm.setToolTip(
            "Compare them with the lead's e-mail or read them out on the phone: this is what "
            "protects the site from connecting to an impostor."
        )
        code_label = QLabel("Invitation &code:")
        code_label.setBuddy(self.code)
        details = QWidget()
        form = QFormLayout(details)
        form.addRow("Federation:", self.federation)
        form.addRow("Coordinator:", self.address)
        form.addRow("Certificate fingerprint:", self.fingerprint)
        form.addRow("Valid for:", self.expiry)
        self.details = details
        name_form = QFormLayout()
        name_form.addRow("This site's &name:", self.site_name)
        layout = QVBoxLayout(self)
        layout.addWidget(code_label)
        layout.addWidget(self.code)
        layout.addLayout(name_form)
        layout.addWidget(self.problem)
        layout.addWidget(details)
        layout.addWidget(self.confirm)
        layout.addStretch(1)
        self.check: InvitationCheck = check_invitation("", clock())
        self.code.textChanged.connect(self._changed)
        self.confirm.toggled.connect(self.completeChanged)
        self._changed()

    def _changed(self) -> None:
        text = self.code.toPlainText()
        self.check = check_invitation(text, self.clock())
        inv = self.check.invitation
        shown = inv is not None
        self.details.setVisible(shown)
        if inv is not None:
            self.federation.setText(inv.federation)
            self.address.setText(
                f"{inv.coordinator_url}  (host {self.check.host}, port {self.check.port})"
            )
            groups = format_fingerprint(inv.fingerprint).split(" ")
            self.fingerprint.setText(f"<tt>{' '.join(groups[:8])}<br>{' '.join(groups[8:])}</tt>")
            self.expiry.setText(
                time_left(inv.expires_at, self.clock())
                + f" (until {datetime.fromtimestamp(inv.expires_at):%d %b %Y %H:%M})"
            )
        if self.check.ok:
            set_message(self.problem, "The code is complete. Please check the details below.", OK)
        elif text.strip():
            set_message(self.problem, self.check.problem, ERROR)
        else:
            set_message(self.problem, self.check.problem)
        self.confirm.setEnabled(self.check.ok)
        if not self.check.ok:
            self.confirm.setChecked(False)
        self.completeChanged.emit()

    def isComplete(self) -> bool:
        return self.check.ok and self.confirm.isChecked()


class EnrolPage(QWizardPage):
    enrolled = Signal(object)  # SiteConfig
    failed = Signal(object)  # UserMessage

    def __init__(self, runner: TaskRunner) -> None:
        super().__init__()
        self.runner = runner
        self.config: SiteConfig | None = None
        self.task: Task[SiteConfig] | None = None
        self.setTitle("Join the federation")
        self.setSubTitle(
            "Tessera now makes this site's key (it never leaves this computer) and presents "
            "the code to the coordinator over an encrypted connection."
        )
        self.status = _wrapping()
        self.headline = _wrapping()
        self.retry = QPushButton("&Try again")
        self.retry.setToolTip("Contact the coordinator again with the same code.")
        self.retry.clicked.connect(self.start)
        self.retry.hide()
        layout = QVBoxLayout(self)
        layout.addWidget(self.headline)
        layout.addWidget(self.status)
        layout.addWidget(self.retry)
        layout.addStretch(1)

    def initializePage(self) -> None:
        if self.config is None:
            self.start()

    def start(self) -> None:
        wizard = self.wizard()
        assert isinstance(wizard, FirstRunWizard)
        code = wizard.invitation_page.code.toPlainText()
        name = wizard.invitation_page.site_name.text()
        folder = wizard.folder_page.check.site_dir.root
        self.retry.hide()
        set_message(self.headline, "", headline="Enrolling...")
        set_message(self.status, "Making the site key and contacting the coordinator.", WAITING)
        self.task = self.runner.run(
            "Enrolling this site",
            lambda _ctx: enrol_site(code, folder, name),
            on_done=self._done,
            on_failed=self._failed,
            owner=self,
        )
        self._update_buttons()

    def _done(self, config: SiteConfig) -> None:
        self.config = config
        set_message(self.headline, "", OK, headline=f"Welcome to {config.federation}")
        set_message(
            self.status,
            f"This site is enrolled as '{config.site_name}' (site ID {config.site_id}). "
            "Its key is kept in the data folder and never leaves this computer. "
            "Press Finish to open Tessera.",
        )
        self._update_buttons()
        self.enrolled.emit(config)

    def _failed(self, exc: BaseException) -> bool:
        message = describe_error(exc, "enrolling this site", self.runner.errors.log_file)
        set_message(self.headline, "", ERROR, headline=message.title)
        set_message(self.status, f"{message.text} (error code {message.code})")
        self.retry.setVisible(message.code.startswith("net."))
        self._update_buttons()
        self.failed.emit(message)
        return True  # shown here, where the person can act on it

    def isComplete(self) -> bool:
        return self.config is not None

    def _update_buttons(self) -> None:
        """Back and Cancel are off while the coordinator is answering (the code may be
        spent by then) and Back stays off once the site is enrolled."""
        self.completeChanged.emit()  # the wizard refreshes its buttons first
        wizard = self.wizard()
        if wizard is None:
            return
        busy = self.busy()
        back = wizard.button(QWizard.WizardButton.BackButton)
        back.setEnabled(not busy and self.config is None)
        wizard.button(QWizard.WizardButton.CancelButton).setEnabled(not busy)

    def busy(self) -> bool:
        return self.task is not None and self.task.running


class FirstRunWizard(QWizard):
    """Ends accepted with ``site_dir`` and ``config`` set (a new or an existing site)."""

    def __init__(
        self,
        runner: TaskRunner,
        initial_folder: Path | None = None,
        clock: Callable[[], float] = time.time,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Set up Tessera at this site")
        self.folder_page = FolderPage(initial_folder)
        self.invitation_page = InvitationPage(clock)
        self.enrol_page = EnrolPage(runner)
        self.setPage(FOLDER_PAGE, self.folder_page)
        self.setPage(INVITATION_PAGE, self.invitation_page)
        self.setPage(ENROL_PAGE, self.enrol_page)
        self.setStartId(FOLDER_PAGE)
        self.resize(720, 560)
        # QWizard sets its buttons after initializePage(); the enrol page's say comes last
        self.currentIdChanged.connect(self._page_changed)

    def _page_changed(self, page_id: int) -> None:
        if page_id == ENROL_PAGE:
            self.enrol_page._update_buttons()

    @property
    def site_dir(self) -> SiteDir | None:
        check = self.folder_page.check
        return SiteDir(check.path) if check.usable and check.path is not None else None

    @property
    def config(self) -> SiteConfig | None:
        return self.folder_page.check.enrolled or self.enrol_page.config

    def reject(self) -> None:
        if self.enrol_page.busy():
            return  # the coordinator is answering; closing now could leave the code used
        super().reject()
