"""Taking part in training, as a service a view can start, pause, resume, withdraw and watch.

Theory of operation
-------------------
:class:`ParticipationService` runs one :class:`~site_client.core.participant.Participant` in
a thread of its own with its own asyncio event loop (the participant is asyncio code; the
caller's thread, the site app's Qt event loop, must never wait on it). The participant
reports each step through ``on_phase`` (a :class:`~site_client.core.participant.PhaseEvent`)
and training progress through ``on_progress``; :func:`apply` and :func:`with_progress` fold
those into a frozen :class:`Snapshot`, a plain model of "what is running at my site right
now?": the connection, the current run and round, what the site is doing, a per-round
history, the privacy budget. Folding is pure (no clock, no I/O) and tested on its own; the
service only holds the latest snapshot and hands each new one to ``on_change``, on the
participant's thread (a Qt view re-emits it as a queued signal).

Pause, resume and withdraw
--------------------------
*Pause* disconnects: the participant is cancelled cleanly (its training process is stopped,
its connection closed), so while paused nothing runs and nothing leaves this hospital. The
coordinator sees the site offline and carries on without it, as it does for any site that
drops out (the plan's quorum decides whether a round still closes). An update already
computed waits in the outbox and is offered again on *resume*, which starts a new
participant. We chose this over staying connected and declining every round because it is
what "pause" means to the people using it, it needs no protocol change, and it leaves no
process busy on a machine that may be needed for clinical work.

*Withdraw* stops in the same way and records in the site's governance record (its activity
timeline) that a named person withdrew the site, with the reason. The protocol has no
"withdraw" message yet, so the coordinator learns of it only as the site going offline: the
page says so and tells the person to inform the consortium lead.

Privacy budget
--------------
Plans of this version add no differential-privacy noise (``governance_view.plan_privacy``),
so no privacy budget is spent and the snapshot says so in words instead of showing a zero
that would read as a measurement. The site policy's cap (``max_epsilon``) is shown beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from shared.errors import TesseraError
from site_client.core.config import SiteDir
from site_client.core.governance_link import StandingApprovals
from site_client.core.participant import LocalData, Participant, PhaseEvent

__all__ = [
    "WITHDREW",
    "Doing",
    "Link",
    "ParticipationService",
    "PrivacyBudget",
    "RoundRecord",
    "Snapshot",
    "apply",
    "load_history",
    "with_progress",
]

log = logging.getLogger("tessera.site")

#: The governance record's activity kind for a withdrawal.
WITHDREW = "site_withdrew"


class Link(Enum):
    """The connection to the coordinator, as the Participation page and status bar show it."""

    IDLE = "idle"  # not taking part (never started, or stopped)
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # lost; the participant reconnects by itself (see reason)
    PAUSED = "paused"
    WITHDRAWN = "withdrawn"
    STOPPED = "stopped"  # stopped by a problem that needs a person (see alert)


class Doing(Enum):
    """What the site is doing in the current round."""

    NOTHING = "nothing"
    WAITING = "waiting"
    DOWNLOADING = "downloading"
    TRAINING = "training"
    UPLOADING = "uploading"
    VALIDATING = "validating"


_DOING_WORDS = {
    Doing.NOTHING: "Not taking part in training",
    Doing.WAITING: "Waiting for the coordinator's next round",
    Doing.DOWNLOADING: "Receiving the shared model",
    Doing.TRAINING: "Training the model on this hospital's images",
    Doing.UPLOADING: "Sending this site's model update (weights only, no images)",
    Doing.VALIDATING: "Checking the shared model on this hospital's held-out images",
}


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One round of one run at this site. ``train_loss``: this site's local training (known
    for rounds trained since the service started); ``metrics``: the shared (global) model
    after this round, evaluated on this site's held-out images (AUC, accuracy, loss...)."""

    run_id: str
    round: int
    train_loss: float | None = None
    num_samples: int | None = None
    accepted: bool = False
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PrivacyBudget:
    """Differential-privacy budget (epsilon) spent by the current run here, and the site
    policy's cap. ``spent`` is ``None`` when the plan uses no differential privacy."""

    spent: float | None = None
    cap: float | None = None

    @property
    def text(self) -> str:
        cap = (
            f"This hospital's policy allows at most epsilon {self.cap:g} per run."
            if self.cap is not None
            else "This hospital's policy sets no privacy budget limit."
        )
        if self.spent is None:
            return (
                "No privacy budget used: the current plans add no differential-privacy noise, "
                "so there is no budget to count. " + cap
            )
        return f"Privacy budget spent in this run: epsilon {self.spent:.2f}. " + cap


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the Participation page shows, at one moment."""

    link: Link = Link.IDLE
    reason: str = ""  # why the connection was lost or a round declined
    alert: str = ""  # a problem that stopped participation and needs a person
    federation: str = ""
    run_id: str = ""
    round: int = 0
    rounds: int | None = None  # the plan's number of rounds
    doing: Doing = Doing.NOTHING
    step: int = 0
    total: int = 0
    history: tuple[RoundRecord, ...] = ()
    privacy: PrivacyBudget = PrivacyBudget()

    @property
    def active(self) -> bool:
        """The participant runs (connected or trying to be)."""
        return self.link in (Link.CONNECTING, Link.CONNECTED, Link.DISCONNECTED)

    @property
    def doing_text(self) -> str:
        text = _DOING_WORDS[self.doing]
        if self.doing is Doing.TRAINING and self.total:
            text += f" (step {self.step} of {self.total})"
        return text

    @property
    def round_text(self) -> str:
        if not self.run_id:
            return "No run yet"
        of = f" of {self.rounds}" if self.rounds else ""
        return f"Run {self.run_id}, round {self.round}{of}"

    def run_history(self) -> tuple[RoundRecord, ...]:
        """The rounds of the current run (or of the latest run seen), in order."""
        run = self.run_id or (self.history[-1].run_id if self.history else "")
        return tuple(r for r in self.history if r.run_id == run)


def _merge(history: tuple[RoundRecord, ...], run_id: str, rnd: int, **changes: Any):
    rows = list(history)
    for i, row in enumerate(rows):
        if (row.run_id, row.round) == (run_id, rnd):
            rows[i] = replace(row, **changes)
            return tuple(rows)
    rows.append(RoundRecord(run_id, rnd, **changes))
    return tuple(sorted(rows, key=lambda r: (r.run_id != run_id, r.run_id, r.round)))


def apply(snap: Snapshot, event: PhaseEvent) -> Snapshot:
    """The snapshot after ``event`` (pure)."""
    d = event.detail
    p = event.phase
    if p == "connecting":
        return replace(snap, link=Link.CONNECTING, doing=Doing.NOTHING, alert="")
    if p == "connected":
        fed = str(d.get("federation") or snap.federation)
        return replace(snap, link=Link.CONNECTED, reason="", federation=fed, doing=Doing.WAITING)
    if p == "disconnected":
        return replace(
            snap, link=Link.DISCONNECTED, reason=str(d.get("reason", "")), doing=Doing.NOTHING
        )
    at = {"run_id": event.run_id, "round": event.round} if event.run_id else {}
    if p == "downloading":
        rounds = d.get("rounds")
        return replace(
            snap,
            **at,
            rounds=rounds if isinstance(rounds, int) else snap.rounds,
            doing=Doing.DOWNLOADING,
            step=0,
            total=0,
            reason="",
        )
    if p == "training":
        return replace(snap, **at, doing=Doing.TRAINING, step=0, total=0)
    if p == "uploading":
        loss = d.get("train_loss")
        history = _merge(
            snap.history,
            event.run_id,
            event.round,
            train_loss=float(loss) if isinstance(loss, int | float) else None,
            num_samples=d.get("num_samples"),
        )
        return replace(snap, **at, doing=Doing.UPLOADING, history=history)
    if p == "accepted":
        history = _merge(snap.history, event.run_id, event.round, accepted=True)
        return replace(snap, doing=Doing.WAITING, history=history)
    if p == "validating":
        return replace(snap, doing=Doing.VALIDATING)
    if p == "validated":
        metrics = dict(d.get("metrics") or {})
        history = _merge(snap.history, event.run_id, event.round, metrics=metrics)
        return replace(snap, doing=Doing.WAITING, history=history)
    if p == "declined":
        return replace(snap, **at, doing=Doing.WAITING, reason=str(d.get("reason", "")))
    if p == "finished":
        return replace(snap, **at, rounds=event.round, doing=Doing.WAITING)
    return snap  # a phase this version does not know: nothing to show


def with_progress(snap: Snapshot, step: int, total: int) -> Snapshot:
    """The snapshot with training at ``step`` of ``total``."""
    return replace(snap, step=step, total=total)


def load_history(rows: list[dict[str, Any]]) -> tuple[RoundRecord, ...]:
    """Rounds recorded in the governance record's activity (``SiteGovernance.activity()``):
    updates the coordinator accepted and validations this site reported."""
    history: tuple[RoundRecord, ...] = ()
    for row in rows:
        d = row["detail"]
        run_id, rnd = d.get("run_id"), d.get("round")
        if not isinstance(run_id, str) or not isinstance(rnd, int):
            continue
        if row["kind"] == "update_accepted":
            history = _merge(history, run_id, rnd, accepted=True, num_samples=d.get("num_samples"))
        elif row["kind"] == "validation_reported":
            history = _merge(history, run_id, rnd, metrics=dict(d.get("metrics") or {}))
    return tuple(sorted(history, key=lambda r: (r.run_id, r.round)))


class ParticipationService:
    """Runs the participant off the caller's thread (see the module docstring).

    ``on_change(snapshot)`` is called on the participant's thread after every change;
    ``participant_options`` go to :class:`Participant` (``standing``, ``backoff``...)."""

    def __init__(
        self,
        site_dir: SiteDir,
        data: LocalData | None = None,
        *,
        on_change: Callable[[Snapshot], None] | None = None,
        threads: int | None = None,
        standing: StandingApprovals | None = None,
        progress_interval_s: float = 0.1,
        **participant_options: Any,
    ) -> None:
        self.site_dir = site_dir
        self.data = data or LocalData.site_index()
        self.on_change = on_change
        self.threads = threads
        self.standing = standing
        self.progress_interval_s = progress_interval_s
        self.participant_options = participant_options
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._stopping: Link | None = None
        self._last_progress = float("-inf")
        self._snapshot = Snapshot(privacy=self._privacy())
        with contextlib.suppress(TesseraError, OSError):
            self._snapshot = replace(self._snapshot, history=self._recorded_history())

    # -- state -----------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _update(self, change: Callable[[Snapshot], Snapshot]) -> None:
        with self._lock:
            self._snapshot = snap = change(self._snapshot)
        if self.on_change is not None:
            try:
                self.on_change(snap)
            except Exception:  # a view's bug must not stop training
                log.exception("the participation view failed to take a snapshot")

    def _on_phase(self, event: PhaseEvent) -> None:
        self._update(lambda s: apply(s, event))

    def _on_progress(self, step: int, total: int) -> None:
        now = time.monotonic()
        if step < total and now - self._last_progress < self.progress_interval_s:
            return  # a fast loop must not flood the view
        self._last_progress = now
        self._update(lambda s: with_progress(s, step, total))

    def _open_record(self):
        from site_client.core.activity import open_governance

        return open_governance(self.site_dir)

    def _recorded_history(self) -> tuple[RoundRecord, ...]:
        record = self._open_record()
        try:
            return load_history(record.activity())
        finally:
            record.close()

    def _privacy(self) -> PrivacyBudget:
        try:
            record = self._open_record()
        except (TesseraError, OSError):
            return PrivacyBudget()
        try:
            return PrivacyBudget(spent=None, cap=record.policy().max_epsilon)
        finally:
            record.close()

    # -- intent ----------------------------------------------------------------------------

    def start(self) -> None:
        """Take part: connect and train in the rounds of approved plans (no-op if running)."""
        if self.running:
            return
        self._stopping = None
        self._update(lambda s: replace(s, link=Link.CONNECTING, alert="", reason=""))
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._main, args=(started,), name="participation", daemon=True
        )
        self._thread.start()
        started.wait(10)

    def resume(self) -> None:
        self.start()

    def pause(self, timeout_s: float = 30.0) -> bool:
        """Disconnect and stop training until :meth:`resume`; True once stopped."""
        return self._stop(Link.PAUSED, timeout_s)

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop taking part (the app is closing); True once the participant has ended."""
        return self._stop(Link.IDLE, timeout_s)

    def withdraw(self, person: str, reason: str = "", timeout_s: float = 30.0) -> bool:
        """Stop and record in the governance record that ``person`` withdrew this site."""
        person = " ".join(person.split())
        if not person:
            raise TesseraError(
                "Type your name before withdrawing: the site's record says who withdrew it.",
                code="governance.no_person",
            )
        stopped = self._stop(Link.WITHDRAWN, timeout_s)
        snap = self.snapshot
        record = self._open_record()
        try:
            record.note(
                WITHDREW,
                time.time(),
                person=person,
                reason=" ".join(reason.split()),
                run_id=snap.run_id,
                round=snap.round,
            )
        finally:
            record.close()
        return stopped

    def _stop(self, link: Link, timeout_s: float) -> bool:
        self._stopping = link
        loop, task, thread = self._loop, self._task, self._thread
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(task.cancel)
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                return False
        self._update(lambda s: replace(s, link=link, doing=Doing.NOTHING, step=0, total=0))
        return True

    # -- the participant's thread ----------------------------------------------------------

    def _main(self, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            try:
                participant = Participant(
                    self.site_dir,
                    self.data,
                    threads=self.threads or self._policy_threads(),
                    on_phase=self._on_phase,
                    on_progress=self._on_progress,
                    standing=self.standing,
                    **self.participant_options,
                )
            except TesseraError as exc:
                self._failed(exc.message)
                return
            self._task = loop.create_task(participant.run())
            started.set()
            try:
                loop.run_until_complete(self._task)
            except asyncio.CancelledError:
                pass  # paused, stopped or withdrawn: ``_stop`` sets the state
            except TesseraError as exc:
                self._failed(exc.message)
            except Exception as exc:  # the adapter's edge: a state, and the details in the log
                log.exception("taking part in training stopped")
                self._failed(f"Taking part stopped unexpectedly ({type(exc).__name__}).")
            else:
                if self._stopping is None:
                    self._update(lambda s: replace(s, link=Link.IDLE, doing=Doing.NOTHING))
        finally:
            started.set()
            self._task = None
            self._loop = None
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _failed(self, message: str) -> None:
        log.error("taking part in training stopped: %s", message)
        self._update(
            lambda s: replace(s, link=Link.STOPPED, alert=message, doing=Doing.NOTHING, step=0)
        )

    def _policy_threads(self) -> int:
        try:
            record = self._open_record()
        except (TesseraError, OSError):
            return 1
        try:
            return record.policy().threads(os.cpu_count() or 1)
        finally:
            record.close()
