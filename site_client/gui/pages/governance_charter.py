"""The Governance page's Charter tab: the federation's terms, and accepting them (signed).

The charter is shown as the Markdown the coordinator sent, rendered without raw HTML (the text
comes from elsewhere; only Markdown formatting is honoured), with its version and SHA-256
fingerprint grouped for reading aloud, so a person can compare it with the copy the consortium
lead circulated. Accepting asks for confirmation in a dialog that says what signing means, then
signs on the task runner (``core.governance_view.accept_charter``).
"""

from __future__ import annotations

import time

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QTextDocument
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from shared.protocol.messages import CharterSignature
from site_client.core.config import SiteDir
from site_client.core.governance import CharterOffer
from site_client.core.governance_view import GovernanceView, accept_charter, person_problem
from site_client.core.onboarding import format_fingerprint
from site_client.gui.errors import describe_error
from site_client.gui.style import ERROR, OK, WAITING, set_message
from site_client.gui.tasks import Task, TaskRunner

__all__ = ["CharterPanel"]

#: GitHub-flavoured Markdown (tables, lists, links) but no raw HTML blocks or images.
MARKDOWN = (
    QTextDocument.MarkdownFeature.MarkdownDialectGitHub
    | QTextDocument.MarkdownFeature.MarkdownNoHTML
)


def signing_text(charter: CharterOffer, person: str) -> str:
    return (
        f"You are about to accept version {charter.version} of the charter as {person}, on "
        "behalf of this hospital.\n\n"
        "Signing means: this site's private key makes a digital signature over the charter's "
        "version, its SHA-256 fingerprint and your name. The coordinator, the other hospitals "
        "and any auditor can check that this hospital accepted exactly this text, and no one "
        "else can make that signature. A signature cannot be taken back; a new version of the "
        "charter will ask for a new one."
    )


class CharterPanel(QWidget):
    accepted = Signal(object)  # CharterSignature
    changed = Signal()

    def __init__(
        self,
        site_dir: SiteDir,
        runner: TaskRunner,
        name: QLineEdit,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.site_dir = site_dir
        self.runner = runner
        self.name = name
        self.charter: CharterOffer | None = None
        self.task: Task[CharterSignature] | None = None
        self.confirm_box: QMessageBox | None = None

        self.title = QLabel()
        self.fingerprint = QLabel()
        self.fingerprint.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.fingerprint.setToolTip(
            "The SHA-256 fingerprint of the exact text. Compare it with the one the consortium "
            "lead sent you: the same fingerprint means the same words, to the letter."
        )
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.text = QTextBrowser()
        self.text.setOpenLinks(False)  # the terms stay on screen; links are shown, not followed
        self.text.setToolTip("The federation's terms, as the coordinator sent them.")
        self.accept_button = QPushButton("&Accept and sign...")
        self.accept_button.setToolTip(
            "Accept this version of the charter on behalf of this hospital, signed with the "
            "site key and your name."
        )
        self.accept_button.clicked.connect(self.ask_to_accept)
        self.message = QLabel()
        self.message.setWordWrap(True)
        buttons = QHBoxLayout()
        buttons.addWidget(self.accept_button)
        buttons.addWidget(self.message, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(self.title)
        layout.addWidget(self.fingerprint)
        layout.addWidget(self.status)
        layout.addWidget(self.text, 1)
        layout.addLayout(buttons)
        self.show_view(None)

    def show_view(self, view: GovernanceView | None) -> None:
        charter = view.charter if view is not None else None
        self.charter = charter
        if charter is None:
            self.title.setText("<b>Charter</b>")
            self.fingerprint.clear()
            self.text.clear()
        else:
            self.title.setText(f"<b>Charter, version {charter.version}</b>")
            self.fingerprint.setText(f"SHA-256: <tt>{format_fingerprint(charter.sha256)}</tt>")
            self.text.document().setMarkdown(charter.text, MARKDOWN)
        accepted = charter is not None and bool(charter.accepted_by)
        status = view.charter_status if view is not None else "Reading the charter..."
        set_message(self.status, status, OK if accepted else WAITING if charter else None)
        self._enable()

    def _enable(self) -> None:
        running = self.task is not None and self.task.running
        self.accept_button.setEnabled(
            self.charter is not None and not self.charter.accepted_by and not running
        )

    def ask_to_accept(self) -> QMessageBox | None:
        """Check the name, then ask for confirmation (a dialog that does not block)."""
        if self.charter is None:
            return None
        if self.confirm_box is not None and self.confirm_box.isVisible():
            return self.confirm_box  # one question at a time
        problem = person_problem(self.name.text())
        if problem:
            set_message(self.message, problem, ERROR)
            self.name.setFocus()
            return None
        set_message(self.message, "")
        person = " ".join(self.name.text().split())
        box = QMessageBox(
            QMessageBox.Icon.Question,
            "Accept and sign the charter?",
            signing_text(self.charter, person),
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
            self,
        )
        sign_button = box.button(QMessageBox.StandardButton.Yes)
        sign_button.setText("&Sign")
        box.setDefaultButton(QMessageBox.StandardButton.Cancel)
        version = self.charter.version

        def answered(_result: int) -> None:
            if box.clickedButton() is sign_button:
                self.sign(version, person)
            self.confirm_box = None

        box.finished.connect(answered)
        self.confirm_box = box
        box.open()
        return box

    def sign(self, version: int, person: str) -> Task[CharterSignature]:
        site_dir = self.site_dir
        set_message(self.message, "Signing...")
        self.task = self.runner.run(
            "Signing the charter",
            lambda _ctx: accept_charter(site_dir, version, person, now=time.time()),
            on_done=self._signed,
            on_failed=self._failed,
            owner=self,
        )
        self._enable()
        return self.task

    def _signed(self, signature: CharterSignature) -> None:
        set_message(
            self.message,
            f"Accepted and signed by {signature.person}. The signature goes to the "
            "coordinator the next time this site connects.",
            OK,
        )
        self._enable()
        self.accepted.emit(signature)
        self.changed.emit()

    def _failed(self, exc: BaseException) -> bool:
        message = describe_error(exc, "signing the charter", self.runner.errors.log_file)
        set_message(self.message, message.text, ERROR, headline="The charter was not signed")
        self._enable()
        return True
