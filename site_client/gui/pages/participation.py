"""The Participation page: is this site taking part, in which round, doing what, and how the
shared model does on this hospital's own held-out images.

A thin view over :class:`~site_client.core.participation.ParticipationService`: the service
calls ``on_change`` on the participant's thread; the page re-emits the snapshot as a Qt signal
(``snapshot_changed``), which Qt queues to the GUI thread, and :meth:`show_snapshot` draws it.
Start and Resume start the service; Pause and Withdraw stop it through the task runner (the
participant ends its training process first, which can take a moment), so the window never
waits. Withdraw asks for confirmation and a name, and is recorded in the site's activity.

Charts (pyqtgraph, the app's chart library): per round of the current run, the shared model's
AUC and accuracy on this site's held-out images, and this site's training loss beside the
shared model's loss on the same held-out images.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("PYQTGRAPH_QT_LIB", "PySide6")

import pyqtgraph as pg  # after choosing the binding above
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from site_client.core.config import SiteDir
from site_client.core.participation import Doing, Link, ParticipationService, Snapshot
from site_client.core.status import Connection
from site_client.gui.style import ACCENT, ERROR, IDLE, OK, WAITING, dot, set_message
from site_client.gui.tasks import TaskRunner

__all__ = ["SECOND_SERIES", "ParticipationPage", "connection_for"]

_LINK = {
    Link.IDLE: (IDLE, "Not taking part in training"),
    Link.CONNECTING: (WAITING, "Connecting to the coordinator"),
    Link.CONNECTED: (OK, "Connected to the coordinator"),
    Link.DISCONNECTED: (WAITING, "Connection lost, trying again"),
    Link.PAUSED: (IDLE, "Paused: not connected, nothing runs or leaves this hospital"),
    Link.WITHDRAWN: (ERROR, "Withdrawn from training"),
    Link.STOPPED: (ERROR, "Stopped: needs your attention"),
}

SECOND_SERIES = "#e07b00"  # the second series of a chart (distinct from the accent colour)


def connection_for(link: Link) -> Connection:
    """The status bar's connection state for a participation link."""
    return {
        Link.CONNECTING: Connection.CONNECTING,
        Link.CONNECTED: Connection.CONNECTED,
        Link.DISCONNECTED: Connection.FAILED,
        Link.STOPPED: Connection.FAILED,
    }.get(link, Connection.OFFLINE)


class RoundChart(QWidget):
    """Two series over rounds, with a legend; values may be missing for some rounds."""

    def __init__(
        self,
        title: str,
        tooltip: str,
        names: tuple[str, str],
        y_label: str,
        y_max: float | None = None,
    ) -> None:
        super().__init__()
        self.y_max = y_max  # a fixed scale (scores run from 0 to 1); None: from the data
        palette = self.palette()
        text = palette.color(QPalette.ColorRole.Text)
        self.plot = pg.PlotWidget(background=palette.color(QPalette.ColorRole.Base))
        self.plot.setMenuEnabled(False)
        self.plot.setMouseEnabled(x=False, y=False)
        self.plot.hideButtons()
        for side in ("left", "bottom"):
            axis = self.plot.getAxis(side)
            axis.setTextPen(text)
            axis.setPen(text)
            axis.enableAutoSIPrefix(False)  # "score (x0.001)" reads as nonsense here
        self.plot.setLabel("bottom", "round")
        self.plot.setLabel("left", y_label)
        self.plot.addLegend(offset=(-10, 10), labelTextColor=text)
        self.names = names
        self.series: dict[str, tuple[list[int], list[float]]] = {}
        self.curves = [
            self.plot.plot(
                [],
                [],
                name=name,
                pen=pg.mkPen(colour, width=2),
                symbol="o",
                symbolBrush=colour,
                symbolPen=colour,
                symbolSize=7,
            )
            for name, colour in zip(names, (ACCENT, SECOND_SERIES), strict=True)
        ]
        self.title = QLabel(f"<b>{title}</b>")
        self.empty = QLabel("No rounds yet.")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.title)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.empty)
        self.setToolTip(tooltip)
        self.setMinimumHeight(180)

    def set_series(self, rounds: list[int], values: tuple[list[float | None], ...]) -> None:
        shown = False
        self.series = {}
        for name, curve, ys in zip(self.names, self.curves, values, strict=True):
            xs = [r for r, y in zip(rounds, ys, strict=True) if _number(y)]
            vs = [float(y) for y in ys if _number(y)]  # type: ignore[arg-type]
            self.series[name] = (xs, vs)
            curve.setData(xs, vs)
            shown = shown or bool(xs)
        self.empty.setVisible(not shown)
        values_shown = [v for _, vs in self.series.values() for v in vs]
        top = self.y_max or (max(values_shown) * 1.15 if values_shown else 1.0)
        self.plot.setYRange(0, top, padding=0)
        if rounds:
            self.plot.setXRange(min(rounds) - 0.3, max(rounds) + 0.3, padding=0)
            self.plot.getAxis("bottom").setTicks([[(r, str(r)) for r in rounds]])


def _number(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(float(value))


class ParticipationPage(QWidget):
    snapshot_changed = Signal(object)  # Snapshot; emitted on any thread, shown on the GUI's
    connection_changed = Signal(object)  # Connection, for the status bar

    def __init__(
        self,
        site_dir: SiteDir,
        runner: TaskRunner,
        service: ParticipationService | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.site_dir = site_dir
        self.runner = runner
        self.service = service or ParticipationService(site_dir)
        self.service.on_change = self.snapshot_changed.emit
        self.snapshot_changed.connect(self.show_snapshot, Qt.ConnectionType.QueuedConnection)
        self.snapshot: Snapshot = self.service.snapshot
        self.confirm_box: QMessageBox | None = None

        # -- state -------------------------------------------------------------------------
        state = QGroupBox("Taking part in training")
        grid = QGridLayout(state)
        self.dot = QLabel()
        self.link = QLabel()
        self.link.setWordWrap(True)
        self.link.setToolTip(
            "This site opens one encrypted connection to the coordinator while it takes part. "
            "Only model updates (numbers, no images, no patient details) leave this hospital."
        )
        self.alert = QLabel()
        self.alert.setWordWrap(True)
        self.round = QLabel()
        self.round.setToolTip(
            "A run trains one model in rounds: in each round every site improves the shared "
            "model on its own images and sends back only the change."
        )
        self.doing = QLabel()
        self.doing.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.privacy = QLabel()
        self.privacy.setWordWrap(True)
        self.privacy.setToolTip(
            "Differential privacy adds calibrated noise so that no single patient can be "
            "recognised from the model; its 'budget' (epsilon) counts how much privacy is "
            "spent. Lower is more private."
        )
        head = QHBoxLayout()
        head.addWidget(self.dot)
        head.addWidget(self.link, 1)
        grid.addLayout(head, 0, 0, 1, 2)
        grid.addWidget(self.alert, 1, 0, 1, 2)
        grid.addWidget(QLabel("Current run:"), 2, 0)
        grid.addWidget(self.round, 2, 1)
        grid.addWidget(QLabel("Doing now:"), 3, 0)
        grid.addWidget(self.doing, 3, 1)
        grid.addWidget(self.progress, 4, 1)
        grid.addWidget(QLabel("Privacy:"), 5, 0, Qt.AlignmentFlag.AlignTop)
        grid.addWidget(self.privacy, 5, 1)
        grid.setColumnStretch(1, 1)

        # -- actions -----------------------------------------------------------------------
        self.start_button = QPushButton("&Start taking part")
        self.start_button.setToolTip(
            "Connect to the coordinator and train in the rounds of the plans this site approved."
        )
        self.pause_button = QPushButton("&Pause")
        self.pause_button.setToolTip(
            "Disconnect and stop training until you resume. The other sites carry on; an "
            "update already computed is sent when you resume."
        )
        self.resume_button = QPushButton("&Resume")
        self.resume_button.setToolTip("Connect again and take part in the next rounds.")
        self.withdraw_button = QPushButton("&Withdraw...")
        self.withdraw_button.setToolTip(
            "Stop taking part and record, in this site's activity, who withdrew it and why."
        )
        self.name = QLineEdit()
        self.name.setPlaceholderText("Your name (recorded if you withdraw)")
        self.reason = QLineEdit()
        self.reason.setPlaceholderText("Reason for withdrawing (optional)")
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.start_button.clicked.connect(self.start)
        self.resume_button.clicked.connect(self.start)
        self.pause_button.clicked.connect(self.pause)
        self.withdraw_button.clicked.connect(self.ask_to_withdraw)
        buttons = QHBoxLayout()
        for b in (self.start_button, self.pause_button, self.resume_button, self.withdraw_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        who = QHBoxLayout()
        who.addWidget(self.name, 1)
        who.addWidget(self.reason, 2)

        # -- charts ------------------------------------------------------------------------
        self.quality = RoundChart(
            "The shared model on this hospital's held-out images",
            "After every round this site checks the shared model on images kept aside for "
            "testing (never used for training) and reports these figures only. AUC: how well "
            "the model ranks positive above negative cases (1 is perfect, 0.5 is chance).",
            ("AUC", "accuracy"),
            "score",
            y_max=1.05,
        )
        self.loss = RoundChart(
            "Loss per round (lower is better)",
            "Training loss: this site's local training in that round. Held-out loss: the "
            "shared model on this site's held-out images.",
            ("training loss", "held-out loss"),
            "loss",
        )
        charts = QHBoxLayout()
        charts.addWidget(self.quality, 1)
        charts.addWidget(self.loss, 1)

        layout = QVBoxLayout(self)
        layout.addWidget(state)
        layout.addLayout(buttons)
        layout.addLayout(who)
        layout.addWidget(self.message)
        layout.addLayout(charts, 1)
        self.show_snapshot(self.snapshot)

    # -- view ------------------------------------------------------------------------------

    def show_snapshot(self, snap: Snapshot) -> None:
        """Draw ``snap`` (GUI thread only)."""
        previous = self.snapshot
        self.snapshot = snap
        colour, words = _LINK[snap.link]
        self.dot.setPixmap(dot(colour))
        if snap.link is Link.CONNECTED and snap.federation:
            words += f" ({snap.federation})"
        if snap.link is Link.DISCONNECTED and snap.reason:
            words += f": {snap.reason}"
        set_message(self.link, words, colour if snap.link is not Link.CONNECTED else None)
        set_message(self.alert, snap.alert, ERROR, headline="Stopped" if snap.alert else "")
        self.alert.setVisible(bool(snap.alert))
        self.round.setText(snap.round_text)
        doing = snap.doing_text if snap.active else _LINK[snap.link][1]
        if snap.active and snap.reason and snap.doing is Doing.WAITING:
            doing += f" (last round declined: {snap.reason})"
        self.doing.setText(doing)
        training = snap.doing is Doing.TRAINING and snap.total > 0
        self.progress.setVisible(snap.active and snap.doing is not Doing.WAITING)
        if training:
            self.progress.setRange(0, snap.total)
            self.progress.setValue(min(snap.step, snap.total))
        else:
            self.progress.setRange(0, 0)  # busy, length unknown
        self.privacy.setText(snap.privacy.text)
        running = self.service.running or snap.active
        self.start_button.setVisible(snap.link not in (Link.PAUSED,))
        self.start_button.setEnabled(not running)
        self.pause_button.setEnabled(running)
        self.resume_button.setVisible(snap.link is Link.PAUSED)
        self.withdraw_button.setEnabled(running or snap.link is Link.PAUSED)
        if snap.history != previous.history or snap.run_id != previous.run_id:
            self._draw_history(snap)
        if snap.link is not previous.link or previous is snap:
            self.connection_changed.emit(connection_for(snap.link))

    def _draw_history(self, snap: Snapshot) -> None:
        rows = snap.run_history()
        rounds = [r.round for r in rows]
        self.quality.set_series(
            rounds,
            ([r.metrics.get("auc") for r in rows], [r.metrics.get("accuracy") for r in rows]),
        )
        self.loss.set_series(
            rounds, ([r.train_loss for r in rows], [r.metrics.get("loss") for r in rows])
        )

    # -- intent ----------------------------------------------------------------------------

    def start(self) -> None:
        self.message.clear()
        self.service.start()
        self.show_snapshot(self.service.snapshot)

    def pause(self) -> None:
        self.pause_button.setEnabled(False)
        self.runner.run(
            "Pausing training",
            lambda _ctx: self.service.pause(),
            on_done=lambda _stopped: self.show_snapshot(self.service.snapshot),
            owner=self,
        )

    def ask_to_withdraw(self) -> QMessageBox | None:
        """Check the name, then ask for confirmation (a dialog that does not block)."""
        if self.confirm_box is not None and self.confirm_box.isVisible():
            return self.confirm_box
        person = " ".join(self.name.text().split())
        if not person:
            set_message(self.message, "Type your name first: the record says who withdrew.", ERROR)
            self.name.setFocus()
            return None
        box = QMessageBox(
            QMessageBox.Icon.Warning,
            "Withdraw this site?",
            f"Withdraw this site from training, as {person}?\n\nTessera stops training here "
            "and records your name and reason in this site's activity. The coordinator only "
            "sees this site go offline: tell the consortium lead that you withdrew. You can "
            "start taking part again later.",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
            self,
        )
        withdraw_button = box.button(QMessageBox.StandardButton.Yes)
        withdraw_button.setText("&Withdraw")
        box.setDefaultButton(QMessageBox.StandardButton.Cancel)

        def answered(_result: int) -> None:
            self.confirm_box = None
            if box.clickedButton() is withdraw_button:
                self.withdraw(person, self.reason.text())

        box.finished.connect(answered)
        self.confirm_box = box
        box.open()
        return box

    def withdraw(self, person: str, reason: str) -> None:
        self.withdraw_button.setEnabled(False)
        self.pause_button.setEnabled(False)

        def done(_stopped: bool) -> None:
            self.show_snapshot(self.service.snapshot)
            set_message(
                self.message,
                f"Withdrawn by {person}; recorded in this site's activity.",
                OK,
            )

        self.runner.run(
            "Withdrawing from training",
            lambda _ctx: self.service.withdraw(person, reason),
            on_done=done,
            owner=self,
        )
