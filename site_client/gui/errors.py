"""The one place where the site app turns a failure into words and shows it.

Every task that fails ends here (``TaskRunner`` hands it over unless the caller handled it);
so does a page that shows an expected problem inline (the wizard's "this code has already
been used"), through :func:`describe_error`, so a failure reads the same wherever it appears.
Our errors already carry a message that says what to do next and a stable code; anything else
is a bug, logged with its traceback to the local log, and shown without one (STYLE.md: nothing
shown in a dialog holds patient data, keys or a stack trace).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QMessageBox, QWidget

from shared.errors import TesseraError

__all__ = ["ErrorReporter", "UserMessage", "describe_error"]

log = logging.getLogger("site_client.gui")


@dataclass(frozen=True, slots=True)
class UserMessage:
    title: str  # a headline in plain words
    text: str  # what happened and what to do next
    code: str  # the stable error code, for the consortium lead or IT support


_TITLES = {
    "identity.invitation_used": "This code has already been used",
    "identity.invitation_expired": "This code has expired",
    "identity.invitation_unknown": "The coordinator does not know this code",
    "identity.invitation_malformed": "This code is not complete",
    "identity.already_enrolled": "This folder already holds a site",
}
_PREFIX_TITLES = (
    ("net.", "Cannot reach the coordinator"),
    ("identity.", "Enrolment was refused"),
    ("data.", "A problem with the data"),
    ("storage.", "Cannot write to the data folder"),
    ("pacs.", "The PACS receiver cannot start"),
    ("config.", "A problem with this site's settings"),
    ("crypto.", "A security check failed"),
)


def describe_error(
    exc: BaseException, doing: str = "", log_file: Path | None = None
) -> UserMessage:
    """Plain words for ``exc``; ``doing`` says what the app was doing ("importing images")."""
    if isinstance(exc, TesseraError):
        title = _TITLES.get(exc.code) or next(
            (t for prefix, t in _PREFIX_TITLES if exc.code.startswith(prefix)),
            "Something went wrong",
        )
        return UserMessage(title, exc.message, exc.code)
    where = f" while {doing}" if doing else ""
    details = f" The details are in the log file {log_file}." if log_file else ""
    return UserMessage(
        "Something unexpected went wrong",
        f"Tessera met a problem it did not expect{where} ({type(exc).__name__}).{details} "
        "Please try again; if it happens again, send the log file to your IT support.",
        "app.unexpected",
    )


class ErrorReporter(QObject):
    """Logs every failure and shows it once: a non-blocking message box over ``parent``.

    ``reported`` carries the :class:`UserMessage` for anything else that wants to show it
    (tests, a status line). Set ``dialogs = False`` where no box may open (screenshots).
    """

    reported = Signal(object)  # UserMessage

    def __init__(self, parent: QObject | None = None, log_file: Path | None = None) -> None:
        super().__init__(parent)
        self.log_file = log_file
        self.dialogs = True
        self.dialog_parent: QWidget | None = None
        self.last: UserMessage | None = None
        self._boxes: list[QMessageBox] = []

    def report(self, exc: BaseException, doing: str = "") -> UserMessage:
        message = describe_error(exc, doing, self.log_file)
        if isinstance(exc, TesseraError):
            log.warning("%s failed: [%s] %s", doing or "a task", exc.code, exc.message)
        else:
            log.error("%s failed", doing or "a task", exc_info=(type(exc), exc, exc.__traceback__))
        self.last = message
        self.reported.emit(message)
        if self.dialogs:
            self._show(message)
        return message

    def _show(self, message: UserMessage) -> None:
        box = QMessageBox(
            QMessageBox.Icon.Warning, message.title, message.text, parent=self.dialog_parent
        )
        box.setInformativeText(f"Error code: {message.code}")
        box.finished.connect(lambda _=0, b=box: self._boxes.remove(b) if b in self._boxes else None)
        self._boxes.append(box)
        box.open()  # window-modal over its parent but never blocks the event loop

    def close_dialogs(self) -> None:
        for box in list(self._boxes):
            box.close()
        self._boxes.clear()
