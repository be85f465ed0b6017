"""The Models page: the model releases the federation sent this hospital, what each is, how
it did on this site's own patients, this site's verdict, and predictions with it.

A thin view over ``core.release_view``. The list is read on the task runner whenever the page
is shown (the participant adds releases in the background), each release verified again. The
"Model card" tab shows the release's own card (intended use, "not a medical device", training
data, performance per site, limitations, privacy), this site's validation and its verdict, and
lets a person accept or refuse the release under their name (signed with the site key; a
refusal needs a reason, which goes to the consortium lead). The "Predictions" tab is
:class:`~site_client.gui.pages.models_predict.PredictPanel`.
"""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSplitter,
    QTabWidget,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from shared.protocol.messages import Dispute, ReleaseAcceptance
from site_client.core.config import SiteDir
from site_client.core.release_view import (
    ReleaseSummary,
    decide,
    dispute_release,
    load_release_summaries,
)
from site_client.gui.errors import describe_error
from site_client.gui.pages.models_predict import PredictPanel
from site_client.gui.style import ERROR, IDLE, OK, WAITING, dot, set_message
from site_client.gui.tasks import Task, TaskRunner

__all__ = ["ModelsPage"]

_COLOURS = {"accepted": OK, "refused": ERROR, "pending": WAITING}


class ModelsPage(QWidget):
    loaded = Signal(object)  # list[ReleaseSummary]
    decided = Signal(object)  # ReleaseAcceptance
    disputed = Signal(object)  # Dispute

    def __init__(self, site_dir: SiteDir, runner: TaskRunner, parent: QWidget | None = None):
        super().__init__(parent)
        self.site_dir = site_dir
        self.runner = runner
        self.summaries: list[ReleaseSummary] = []
        self.refresh_task: Task[list[ReleaseSummary]] | None = None
        self.decide_task: Task[ReleaseAcceptance] | None = None
        self.dispute_task: Task[Dispute] | None = None

        caption = QLabel(
            "Models the federation trained and released to this hospital. Each one is checked "
            "(signatures, weights, the federation's log) before it is shown or used."
        )
        caption.setWordWrap(True)
        self.releases = QListWidget()
        self.releases.setToolTip("Releases this site holds, newest first.")
        self.releases.currentRowChanged.connect(self._selected)
        self.releases.setMinimumWidth(200)

        self.card = QTextBrowser()
        self.card.setOpenExternalLinks(False)
        self.card.setOpenLinks(False)  # a card's links never open anything
        self.verdict = QLabel()
        self.verdict.setWordWrap(True)
        self.metrics = QLabel()
        self.metrics.setWordWrap(True)
        self.metrics.setToolTip(
            "The model checked on this site's held-out patients, which never took part in "
            "training. AUC 1.0 is perfect, 0.5 is chance."
        )
        self.person = QLineEdit()
        self.person.setPlaceholderText("your name, signed with the decision")
        self.reason = QLineEdit()
        self.reason.setPlaceholderText("needed to refuse; sent to the consortium lead")
        self.accept_button = QPushButton("&Accept release")
        self.accept_button.setToolTip(
            "Sign that this hospital accepts the release for research use (signed with the "
            "site key and sent to the coordinator)."
        )
        self.accept_button.clicked.connect(lambda: self.decide_selected(True))
        self.refuse_button = QPushButton("&Refuse release...")
        self.refuse_button.setToolTip(
            "Sign that this hospital refuses the release, with your reason."
        )
        self.refuse_button.clicked.connect(lambda: self.decide_selected(False))
        self.dispute_button = QPushButton("Raise a &dispute...")
        self.dispute_button.setToolTip(
            "Tell the consortium lead something is wrong with this release (for example it is "
            "not what was agreed, or this hospital's contribution is missing). Signed with the "
            "site key, with your reason; the lead resolves it and the report lists it."
        )
        self.dispute_button.clicked.connect(self.dispute_selected)
        self.message = QLabel()
        self.message.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Your name:", self.person)
        form.addRow("Reason:", self.reason)
        buttons = QHBoxLayout()
        buttons.addWidget(self.accept_button)
        buttons.addWidget(self.refuse_button)
        buttons.addStretch(1)
        buttons.addWidget(self.dispute_button)
        decision = QGroupBox("This hospital's verdict")
        box = QVBoxLayout(decision)
        box.addWidget(self.verdict)
        box.addWidget(self.metrics)
        box.addLayout(form)
        box.addLayout(buttons)
        box.addWidget(self.message)
        card_tab = QWidget()
        card_layout = QVBoxLayout(card_tab)
        card_layout.addWidget(self.card, 1)
        card_layout.addWidget(decision)

        self.predict = PredictPanel(site_dir, runner)
        self.tabs = QTabWidget()
        self.tabs.addTab(card_tab, "Model &card")
        self.tabs.addTab(self.predict, "Pre&dictions")

        split = QSplitter()
        split.addWidget(self.releases)
        split.addWidget(self.tabs)
        split.setStretchFactor(1, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(caption)
        layout.addWidget(split, 1)
        self._show(None)

    # -- the list --------------------------------------------------------------------------

    def refresh(self) -> Task[list[ReleaseSummary]]:
        site_dir = self.site_dir
        self.refresh_task = self.runner.run(
            "Checking the model releases",
            lambda _ctx: load_release_summaries(site_dir),
            on_done=self._loaded,
            owner=self,
        )
        self.predict.refresh_studies()
        return self.refresh_task

    def _loaded(self, summaries: list[ReleaseSummary]) -> None:
        current = self.selected.version if self.selected is not None else None
        self.summaries = summaries
        self.releases.blockSignals(True)
        self.releases.clear()
        row = 0
        for i, s in enumerate(summaries):
            state = s.verdict if s.usable else "not usable"
            item = QListWidgetItem(f"Release {s.version}\n{state}")
            item.setIcon(dot(_COLOURS.get(s.verdict, IDLE) if s.usable else ERROR))
            item.setToolTip(s.verdict_text)
            self.releases.addItem(item)
            if s.version == current:
                row = i
        self.releases.blockSignals(False)
        if summaries:
            self.releases.setCurrentRow(row)
        self._show(self.selected)
        self.loaded.emit(summaries)

    @property
    def selected(self) -> ReleaseSummary | None:
        row = self.releases.currentRow()
        return self.summaries[row] if 0 <= row < len(self.summaries) else None

    def _selected(self, _row: int) -> None:
        self._show(self.selected)

    def _show(self, s: ReleaseSummary | None) -> None:
        if s is None:
            self.card.setPlainText(
                "No model release has reached this site yet. When a run this hospital took "
                "part in is released, the model arrives here, checked, with its model card."
            )
            set_message(self.verdict, "")
            self.metrics.setText("")
        else:
            if s.card_html:
                self.card.setHtml(s.card_html)
            else:
                self.card.setPlainText(s.problem or "This release has no model card.")
            colour = ERROR if not s.usable else _COLOURS.get(s.verdict)
            set_message(self.verdict, s.verdict_text, colour, headline=f"Release {s.version}")
            self.metrics.setText(s.metrics_text)
        usable = s is not None and s.usable
        self.dispute_button.setEnabled(s is not None)
        self.accept_button.setEnabled(usable)
        self.refuse_button.setEnabled(usable)
        self.predict.set_release(s.version if s is not None else "", usable)

    # -- deciding --------------------------------------------------------------------------

    def decide_selected(self, accepted: bool) -> Task[ReleaseAcceptance] | None:
        s = self.selected
        if s is None:
            return None
        person, reason = self.person.text().strip(), self.reason.text().strip()
        if not person:
            set_message(self.message, "Type your name: it is signed with the decision.", WAITING)
            self.person.setFocus()
            return None
        if not accepted and not reason:
            set_message(self.message, "Say why this hospital refuses the release.", WAITING)
            self.reason.setFocus()
            return None
        site_dir, version = self.site_dir, s.version
        self.accept_button.setEnabled(False)
        self.refuse_button.setEnabled(False)
        self.decide_task = self.runner.run(
            "Signing the verdict on a model release",
            lambda _ctx: decide(site_dir, version, accepted=accepted, person=person, reason=reason),
            on_done=self._decided,
            on_failed=self._decide_failed,
            owner=self,
        )
        return self.decide_task

    def dispute_selected(self) -> Task[Dispute] | None:
        s = self.selected
        if s is None:
            return None
        person, reason = self.person.text().strip(), self.reason.text().strip()
        if not person or not reason:
            set_message(
                self.message,
                "Type your name and, as the reason, what is wrong with the release.",
                WAITING,
            )
            (self.reason if person else self.person).setFocus()
            return None
        site_dir, version = self.site_dir, s.version
        self.dispute_button.setEnabled(False)
        self.dispute_task = self.runner.run(
            "Signing a dispute on a model release",
            lambda _ctx: dispute_release(site_dir, version, person=person, reason=reason),
            on_done=self._disputed,
            on_failed=self._decide_failed,
            owner=self,
        )
        return self.dispute_task

    def _disputed(self, message: Dispute) -> None:
        self.dispute_button.setEnabled(True)
        set_message(
            self.message,
            f"Dispute on release {message.release} raised by {message.person}, signed with this "
            "site's key. It is sent to the coordinator the next time this site connects; the "
            "consortium lead answers it there.",
            OK,
        )
        self.reason.clear()
        self.disputed.emit(message)

    def _decided(self, message: ReleaseAcceptance) -> None:
        verb = "accepted" if message.accepted else "refused"
        set_message(
            self.message,
            f"Release {message.version} {verb} by {message.person}, signed with this site's "
            "key. It is sent to the coordinator the next time this site connects.",
            OK,
        )
        self.reason.clear()
        self.decided.emit(message)
        self.refresh()

    def _decide_failed(self, exc: BaseException) -> bool:
        self._show(self.selected)
        message = describe_error(exc, "signing the verdict", self.runner.errors.log_file)
        set_message(self.message, message.text, ERROR, headline="Nothing was signed")
        return True

    def select_version(self, version: str) -> None:
        for i, s in enumerate(self.summaries):
            if s.version == version:
                self.releases.setCurrentRow(i)
                return
