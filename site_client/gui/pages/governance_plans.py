"""The Governance page's Plans tab: each training plan offered, explained, checked against the
site policy, and approved or refused (signed).

The list shows every plan with its state; the pane beside it shows the selected plan in the
words of ``core.plan_summary`` (task, model, how long, what leaves and how much, what stays,
combining, protections, privacy budget) and the result of the policy check. A plan below the
policy shows the reasons and its Approve button stays off; the rule itself is
``core.governance_view.decision_problem``, applied here before anything is signed and again by
the service at the moment of signing.
"""

from __future__ import annotations

import time

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import (
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from shared.protocol.messages import PlanDecision
from site_client.core.config import SiteDir
from site_client.core.governance_view import (
    GovernanceView,
    PlanView,
    decide_plan,
    decision_problem,
)
from site_client.gui.errors import describe_error
from site_client.gui.style import ERROR, OK, WAITING, dot, set_message
from site_client.gui.tasks import Task, TaskRunner

__all__ = ["PlansPanel"]

_STATE_COLOURS = {"approve": OK, "refuse": ERROR, "pending": WAITING}


def _wrapping(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setTextFormat(Qt.TextFormat.PlainText)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


class PlansPanel(QWidget):
    decided = Signal(object)  # PlanDecision
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
        self.plans: tuple[PlanView, ...] = ()
        self.task: Task[PlanDecision] | None = None
        self._shown = ""  # the plan in the pane: its message stays until another is selected

        self.list = QListWidget()
        self.list.setToolTip("Training plans the coordinator offered to this hospital.")
        self.list.setIconSize(QSize(12, 12))
        self.list.setWordWrap(True)
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.list.currentRowChanged.connect(self._selected)
        self.empty = _wrapping(
            "No training plan has been offered yet. Plans arrive from the coordinator when "
            "this site is connected."
        )
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        left_layout.addWidget(self.list, 1)
        left_layout.addWidget(self.empty)

        self.title = QLabel()
        self.state = _wrapping()
        self.summary_box = QGroupBox("What this plan does")
        self.summary_form = QFormLayout(self.summary_box)
        self.summary_form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.policy_box = QGroupBox("Check against this site's policy")
        self.policy_box.setToolTip(
            "Every plan is checked against the floor this hospital set on the Site policy tab."
        )
        self.policy_check = QLabel()
        self.policy_check.setWordWrap(True)
        QVBoxLayout(self.policy_box).addWidget(self.policy_check)
        self.reason = QPlainTextEdit()
        self.reason.setPlaceholderText(
            "Why this plan is refused (needed to refuse; signed and sent to the consortium lead)"
        )
        self.reason.setMaximumHeight(70)
        self.reason.setTabChangesFocus(True)
        self.approve_button = QPushButton("A&pprove and sign")
        self.approve_button.setToolTip(
            "Allow this computer to train this exact plan (identified by its hash), signed "
            "with the site key and your name."
        )
        self.approve_button.clicked.connect(self.approve)
        self.refuse_button = QPushButton("&Refuse and sign")
        self.refuse_button.setToolTip(
            "Refuse this plan, signed, with the reason above. This site will not train for it."
        )
        self.refuse_button.clicked.connect(self.refuse)
        self.message = QLabel()
        self.message.setWordWrap(True)
        decide_box = QGroupBox("Your decision")
        decide = QVBoxLayout(decide_box)
        decide.addWidget(QLabel("Reason for a refusal:"))
        decide.addWidget(self.reason)
        buttons = QHBoxLayout()
        buttons.addWidget(self.approve_button)
        buttons.addWidget(self.refuse_button)
        buttons.addStretch(1)
        decide.addLayout(buttons)
        decide.addWidget(self.message)

        detail = QWidget()
        detail_layout = QVBoxLayout(detail)
        detail_layout.addWidget(self.title)
        detail_layout.addWidget(self.state)
        detail_layout.addWidget(self.summary_box)
        detail_layout.addWidget(self.policy_box)
        detail_layout.addWidget(decide_box)
        detail_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(detail)
        self.detail = detail

        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(scroll)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([260, 700])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(splitter)
        self.show_plans(())

    # -- view ------------------------------------------------------------------------------

    def show_view(self, view: GovernanceView) -> None:
        self.show_plans(view.plans)

    def show_plans(self, plans: tuple[PlanView, ...]) -> None:
        current = self.current()
        keep = current.plan_hash if current is not None else None
        self.plans = plans
        self.list.blockSignals(True)
        self.list.clear()
        row = 0
        for i, plan in enumerate(plans):
            item = QListWidgetItem(f"{plan.title}\n{plan.short_status()}")
            item.setIcon(QIcon(dot(_STATE_COLOURS.get(plan.record.decision, WAITING))))
            item.setData(Qt.ItemDataRole.UserRole, plan.plan_hash)
            item.setToolTip(plan.status())
            self.list.addItem(item)
            if plan.plan_hash == keep:
                row = i
        self.list.blockSignals(False)
        self.empty.setVisible(not plans)
        self.detail.setEnabled(bool(plans))
        if plans:
            self.list.setCurrentRow(row)
        self._selected(self.list.currentRow())

    def current(self) -> PlanView | None:
        row = self.list.currentRow()
        return self.plans[row] if 0 <= row < len(self.plans) else None

    def select(self, plan_hash: str) -> None:
        for i, plan in enumerate(self.plans):
            if plan.plan_hash == plan_hash:
                self.list.setCurrentRow(i)

    def _selected(self, _row: int) -> None:
        plan = self.current()
        while self.summary_form.rowCount():
            self.summary_form.removeRow(0)
        shown = plan.plan_hash if plan is not None else ""
        if shown != self._shown:
            set_message(self.message, "")
            self.reason.clear()
        self._shown = shown
        if plan is None:
            self.title.setText("")
            self.state.setText("")
            self.policy_check.setText("")
            self._enable()
            return
        self.title.setText(f"<b>Plan {plan.title}</b>")
        self.title.setToolTip(f"Plan hash (SHA-256 of the plan): {plan.plan_hash}")
        set_message(
            self.state,
            "State: " + plan.status(),
            _STATE_COLOURS.get(plan.record.decision),
        )
        for heading, text in plan.summary.lines:
            self.summary_form.addRow(f"<b>{heading}:</b>", _wrapping(text))
        if plan.meets_policy:
            set_message(self.policy_check, "This plan meets this site's policy.", OK)
        else:
            set_message(
                self.policy_check,
                "\n".join(f"- {r}" for r in plan.refusals),
                ERROR,
                headline="This plan is below this site's policy and cannot be approved:",
            )
        self._enable()

    def _enable(self) -> None:
        plan = self.current()
        running = self.task is not None and self.task.running
        self.approve_button.setEnabled(plan is not None and plan.can_approve and not running)
        self.refuse_button.setEnabled(plan is not None and plan.can_refuse and not running)

    # -- decisions -------------------------------------------------------------------------

    def approve(self) -> Task[PlanDecision] | None:
        return self._decide(approve=True)

    def refuse(self) -> Task[PlanDecision] | None:
        return self._decide(approve=False)

    def _decide(self, *, approve: bool) -> Task[PlanDecision] | None:
        plan = self.current()
        if plan is None:
            return None
        reason = self.reason.toPlainText().strip()
        person = " ".join(self.name.text().split())
        problem = decision_problem(
            approve=approve, reason=reason, person=person, refusals=plan.refusals
        )
        if problem:
            set_message(self.message, problem, ERROR)
            if not person:
                self.name.setFocus()
            elif not approve:
                self.reason.setFocus()
            return None
        site_dir, plan_hash = self.site_dir, plan.plan_hash
        set_message(self.message, "Signing...")
        self.task = self.runner.run(
            "Signing the decision on a plan",
            lambda _ctx: decide_plan(
                site_dir,
                plan_hash,
                approve=approve,
                reason="" if approve else reason,
                person=person,
                now=time.time(),
            ),
            on_done=self._decided,
            on_failed=self._failed,
            owner=self,
        )
        self._enable()
        return self.task

    def _decided(self, decision: PlanDecision) -> None:
        words = "Approved" if decision.decision == "approve" else "Refused"
        set_message(
            self.message,
            f"{words} and signed by {decision.person}. The decision goes to the coordinator "
            "the next time this site connects.",
            OK,
        )
        if decision.decision == "refuse":
            self.reason.clear()
        self._enable()
        self.decided.emit(decision)
        self.changed.emit()

    def _failed(self, exc: BaseException) -> bool:
        message = describe_error(exc, "signing a decision", self.runner.errors.log_file)
        set_message(self.message, message.text, ERROR, headline="Nothing was signed")
        self._enable()
        return True
