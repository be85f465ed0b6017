"""The Governance page's Site policy tab: the floor every plan must meet, as a form.

Each field says in plain words what it means; the form is read by
``core.governance_view.parse_policy_form``, which applies the same ``SitePolicy`` rules the
participant enforces and reports every field that is wrong at once, shown under that field.
Nothing is saved until all of them are right. A reload of the page (after a decision elsewhere)
does not overwrite what someone is typing.
"""

from __future__ import annotations

import time

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from shared.errors import GovernanceError
from shared.governance.policy import SitePolicy
from site_client.core.config import SiteDir
from site_client.core.governance_view import (
    GovernanceView,
    PolicyForm,
    parse_policy_form,
    policy_form,
    save_policy,
)
from site_client.gui.errors import describe_error
from site_client.gui.style import ERROR, OK, set_message
from site_client.gui.tasks import Task, TaskRunner

__all__ = ["PolicyPanel"]


def _hint(text: str) -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setEnabled(False)  # the theme's muted text colour
    return label


def _error_label() -> QLabel:
    label = QLabel()
    label.setWordWrap(True)
    label.hide()
    return label


class PolicyPanel(QWidget):
    saved = Signal(object)  # SitePolicy
    changed = Signal()

    def __init__(self, site_dir: SiteDir, runner: TaskRunner, parent: QWidget | None = None):
        super().__init__(parent)
        self.site_dir = site_dir
        self.runner = runner
        self.policy: SitePolicy | None = None
        self.task: Task[SitePolicy] | None = None
        self.dirty = False

        self.secure = QCheckBox("Require secure &aggregation")
        self.secure.setToolTip(
            "Secure aggregation: the hospitals' updates are masked so that the coordinator "
            "can only add them up; it never sees this hospital's update on its own."
        )
        self.epsilon = QLineEdit()
        self.epsilon.setPlaceholderText("empty: differential privacy not required")
        self.epsilon.setToolTip(
            "The largest privacy budget (epsilon) one run may spend here. Differential privacy "
            "adds calibrated noise so that little can be learnt about any one patient; a "
            "smaller epsilon means more privacy. 1 to 8 is usual."
        )
        self.delta = QLineEdit()
        self.delta.setToolTip(
            "The small chance that the epsilon guarantee does not hold; 0.00001 (1e-5) or "
            "less is usual."
        )
        self.hours = QLineEdit()
        self.hours.setPlaceholderText("empty: any time, or e.g. 19:00-07:00")
        self.hours.setToolTip(
            "When training may run, in this computer's local time (24-hour clock). It may "
            "wrap past midnight, e.g. 19:00-07:00 for nights only."
        )
        self.cpu = QSpinBox()
        self.cpu.setRange(1, 100)
        self.cpu.setSuffix(" %")
        self.cpu.setToolTip("The share of this computer's processor cores training may use.")
        self.errors: dict[str, QLabel] = {
            name: _error_label()
            for name in ("max_epsilon", "max_delta", "training_hours", "cpu_share")
        }
        for widget in (self.epsilon, self.delta, self.hours):
            widget.textEdited.connect(self._edited)
        self.secure.toggled.connect(self._edited)
        self.cpu.valueChanged.connect(self._edited)

        form = QFormLayout()
        form.addRow(self.secure)
        form.addRow(_hint("The coordinator may only ever see the sum of all hospitals' updates."))
        form.addRow("Largest privacy budget (&epsilon):", self.epsilon)
        form.addRow(self.errors["max_epsilon"])
        form.addRow(
            _hint(
                "Differential privacy limits what anyone can learn about one patient from what "
                "leaves this hospital; epsilon measures how much, smaller is more private. "
                "Plans without differential privacy are refused when this is set."
            )
        )
        form.addRow("Largest &delta:", self.delta)
        form.addRow(self.errors["max_delta"])
        form.addRow("Training &hours:", self.hours)
        form.addRow(self.errors["training_hours"])
        form.addRow("Share of the &CPU:", self.cpu)
        form.addRow(self.errors["cpu_share"])
        box = QGroupBox("This hospital's floor for every training plan")
        box.setLayout(form)

        self.save_button = QPushButton("&Save policy")
        self.save_button.setToolTip(
            "Check the values and save them. Plans are checked against the saved policy."
        )
        self.save_button.clicked.connect(self.save)
        self.message = QLabel()
        self.message.setWordWrap(True)
        buttons = QHBoxLayout()
        buttons.addWidget(self.save_button)
        buttons.addWidget(self.message, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(box)
        layout.addLayout(buttons)
        layout.addStretch(1)
        self.set_policy(SitePolicy())
        self.dirty = False

    def show_view(self, view: GovernanceView) -> None:
        if not self.dirty:
            self.set_policy(view.policy)

    def set_policy(self, policy: SitePolicy) -> None:
        self.policy = policy
        form = policy_form(policy)
        for widget in (self.secure, self.epsilon, self.delta, self.hours, self.cpu):
            widget.blockSignals(True)
        self.secure.setChecked(form.require_secure_aggregation)
        self.epsilon.setText(form.max_epsilon)
        self.delta.setText(form.max_delta)
        self.hours.setText(form.training_hours)
        self.cpu.setValue(form.cpu_percent)
        for widget in (self.secure, self.epsilon, self.delta, self.hours, self.cpu):
            widget.blockSignals(False)
        self._show_errors({})
        self.dirty = False

    def form(self) -> PolicyForm:
        return PolicyForm(
            require_secure_aggregation=self.secure.isChecked(),
            max_epsilon=self.epsilon.text(),
            max_delta=self.delta.text(),
            training_hours=self.hours.text(),
            cpu_percent=self.cpu.value(),
        )

    def _edited(self, *_args: object) -> None:
        self.dirty = True

    def _show_errors(self, errors: dict[str, str]) -> None:
        for name, label in self.errors.items():
            text = errors.get(name, "")
            set_message(label, text, ERROR)
            label.setVisible(bool(text))

    def save(self) -> Task[SitePolicy] | None:
        """Check the form; show what is wrong under each field, or save it."""
        try:
            policy = parse_policy_form(self.form())
        except GovernanceError as exc:
            self._show_errors(exc.fields.get("errors", {}))
            set_message(self.message, "Nothing was saved: correct the values marked.", ERROR)
            return None
        self._show_errors({})
        site_dir = self.site_dir
        set_message(self.message, "Saving...")
        self.save_button.setEnabled(False)
        self.task = self.runner.run(
            "Saving the site policy",
            lambda _ctx: save_policy(site_dir, policy, now=time.time()),
            on_done=self._saved,
            on_failed=self._failed,
            owner=self,
        )
        return self.task

    def _saved(self, policy: SitePolicy) -> None:
        self.set_policy(policy)
        self.save_button.setEnabled(True)
        set_message(self.message, "Saved. Every plan is now checked against this policy.", OK)
        self.saved.emit(policy)
        self.changed.emit()

    def _failed(self, exc: BaseException) -> bool:
        self.save_button.setEnabled(True)
        message = describe_error(exc, "saving the site policy", self.runner.errors.log_file)
        set_message(self.message, message.text, ERROR, headline="The policy was not saved")
        return True
