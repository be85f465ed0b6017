"""The site app's one background task runner (after Anki's ``aqt/taskman.py``).

Theory of operation
-------------------
Anything that can take longer than a frame (import, labels, enrolment, reading the index,
decoding an image, starting the PACS receiver) is a *task*: a plain function
``work(ctx) -> result`` that runs on a worker thread of the runner's ``QThreadPool`` and
never touches a widget. It learns about cancellation through ``ctx.should_stop()`` (the same
callable the importer takes) and reports progress through ``ctx.progress(done, total, text)``.

Results come back by signal. Each task has a small bridge ``QObject`` whose signals the
worker emits; they are connected with ``Qt.QueuedConnection`` to slots of the :class:`Task`,
which lives on the GUI thread, so ``on_progress``, ``on_done`` and ``on_failed`` always run
there (a test checks it). Progress is throttled in the worker (``min_interval``) so a fast
loop cannot flood the event queue; the final step always gets through.

Failures have one destination: ``on_failed`` may handle an expected one (the wizard shows a
used code inline) by returning ``True``; everything else goes to the :class:`ErrorReporter`,
the one place that shows errors. A task whose ``owner`` widget has been deleted meanwhile
drops its callbacks instead of touching a dead widget.

The runner also says what the site is doing (``activity_changed``) for the status bar.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from PySide6.QtCore import (
    QEventLoop,
    QObject,
    QRunnable,
    Qt,
    QThreadPool,
    QTimer,
    Signal,
    Slot,
)
from shiboken6 import Shiboken

from site_client.gui.errors import ErrorReporter

__all__ = ["Progress", "Task", "TaskContext", "TaskRunner"]

log = logging.getLogger("site_client.gui")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Progress:
    done: int
    total: int  # 0 when not known
    text: str = ""
    data: Any = None  # the work's own progress object (an ``ImportProgress``), if any


class TaskContext:
    """What a task's work function gets, on its worker thread."""

    def __init__(
        self, stop: threading.Event, emit: Callable[[Progress], None], min_interval: float
    ) -> None:
        self._stop = stop
        self._emit = emit
        self._min_interval = min_interval
        self._last = float("-inf")

    def should_stop(self) -> bool:
        """True once the task was cancelled: stop at the next safe point."""
        return self._stop.is_set()

    def progress(self, done: int, total: int, text: str = "", data: Any = None) -> None:
        """Report progress; calls closer than ``min_interval`` are dropped, except the last
        step (``done >= total > 0``)."""
        now = time.monotonic()
        final = total > 0 and done >= total
        if not final and now - self._last < self._min_interval:
            return
        self._last = now
        self._emit(Progress(done, total, text, data))


class _Bridge(QObject):
    """Signals the worker thread emits; queued to the task on the GUI thread."""

    progressed = Signal(object)
    succeeded = Signal(object)
    failed = Signal(object)


class _Job(QRunnable):
    def __init__(self, work: Callable[[TaskContext], Any], ctx: TaskContext, bridge: _Bridge):
        super().__init__()
        self.setAutoDelete(True)
        self._work = work
        self._ctx = ctx
        self._bridge = bridge

    def run(self) -> None:
        # Make the thread known to ``threading``: code that must not fork from a threaded
        # process (the importer's header-reading pool) then sees that it is one.
        threading.current_thread()
        try:
            result = self._work(self._ctx)
        except BaseException as exc:
            self._bridge.failed.emit(exc)
        else:
            self._bridge.succeeded.emit(result)


class Task(QObject, Generic[T]):
    """One piece of background work, as the GUI thread sees it."""

    progressed = Signal(object)  # Progress
    finished = Signal(object)  # this task, once its callbacks ran

    def __init__(
        self,
        label: str,
        *,
        cancellable: bool,
        on_done: Callable[[T], None] | None,
        on_failed: Callable[[BaseException], bool] | None,
        on_progress: Callable[[Progress], None] | None,
        owner: QObject | None,
        runner: TaskRunner,
    ) -> None:
        super().__init__(runner)
        self.label = label
        self.cancellable = cancellable
        self.state = "running"  # then "done", "cancelled" or "failed"
        self.result: T | None = None
        self.error: BaseException | None = None
        self.last_progress: Progress | None = None
        self.stop = threading.Event()
        self._on_done = on_done
        self._on_failed = on_failed
        self._on_progress = on_progress
        self._owner = owner
        self._runner = runner
        self.bridge = _Bridge(self)
        queued = Qt.ConnectionType.QueuedConnection
        self.bridge.progressed.connect(self._progressed, queued)
        self.bridge.succeeded.connect(self._succeeded, queued)
        self.bridge.failed.connect(self._failed, queued)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def cancel(self) -> None:
        """Ask the work to stop at its next safe point (no effect if not cancellable)."""
        if self.cancellable and self.running:
            self.stop.set()
            self._runner._changed()

    def _alive(self) -> bool:
        return self._owner is None or Shiboken.isValid(self._owner)

    @Slot(object)
    def _progressed(self, progress: Progress) -> None:
        if not self.running:
            return
        self.last_progress = progress
        if self._on_progress is not None and self._alive():
            self._guard(self._on_progress, progress)
        self._runner._changed()
        self.progressed.emit(progress)  # after the owner's view shows it

    @Slot(object)
    def _succeeded(self, result: Any) -> None:
        self.result = result
        self.state = "cancelled" if self.stop.is_set() else "done"
        if self._on_done is not None and self._alive():
            self._guard(self._on_done, result)
        self._finish()

    @Slot(object)
    def _failed(self, exc: BaseException) -> None:
        self.error = exc
        self.state = "failed"
        handled = False
        if self._on_failed is not None and self._alive():
            handled = bool(self._guard(self._on_failed, exc))
        if not handled:
            self._runner.errors.report(exc, self.label.lower())
        self._finish()

    def _guard(self, callback: Callable[[Any], Any], value: Any) -> Any:
        try:
            return callback(value)
        except Exception as exc:  # a bug in a callback: shown once, never lost
            self._runner.errors.report(exc, self.label.lower())
            return True

    def _finish(self) -> None:
        self.finished.emit(self)
        self._runner._done(self)


class TaskRunner(QObject):
    """Runs tasks off the GUI thread; one per app (see the module docstring)."""

    started = Signal(object)  # Task
    finished = Signal(object)  # Task
    activity_changed = Signal(str)  # what the site is doing, "" when nothing

    def __init__(
        self,
        errors: ErrorReporter,
        parent: QObject | None = None,
        *,
        threads: int = 4,
        min_interval: float = 0.05,
    ) -> None:
        super().__init__(parent)
        self.errors = errors
        self.min_interval = min_interval
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(threads)
        self._active: list[Task[Any]] = []

    def run(
        self,
        label: str,
        work: Callable[[TaskContext], T],
        *,
        on_done: Callable[[T], None] | None = None,
        on_failed: Callable[[BaseException], bool] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        cancellable: bool = False,
        owner: QObject | None = None,
    ) -> Task[T]:
        """Start ``work`` on a worker thread; ``label`` says what it does ("Importing
        images") in the status bar and in error messages."""
        task: Task[T] = Task(
            label,
            cancellable=cancellable,
            on_done=on_done,
            on_failed=on_failed,
            on_progress=on_progress,
            owner=owner,
            runner=self,
        )
        ctx = TaskContext(task.stop, task.bridge.progressed.emit, self.min_interval)
        self._active.append(task)
        self.started.emit(task)
        self._changed()
        self.pool.start(_Job(work, ctx, task.bridge))
        return task

    def active(self) -> list[Task[Any]]:
        return list(self._active)

    def activity(self) -> str:
        """The newest running task in words, with its progress ("" when idle)."""
        if not self._active:
            return ""
        task = self._active[-1]
        text = task.label
        if task.stop.is_set():
            return f"{text}: stopping..."
        p = task.last_progress
        if p is not None and p.text:
            text = f"{text}: {p.text}"
        elif p is not None and p.total:
            text = f"{text}: {p.done} of {p.total}"
        more = len(self._active) - 1
        return text + (f" (and {more} more)" if more else "")

    def cancel_all(self) -> None:
        for task in self._active:
            task.cancel()

    def wait_idle(self, timeout_s: float) -> bool:
        """Run the event loop until no task is running (True) or ``timeout_s`` passes."""
        if not self._active:
            return True
        loop = QEventLoop()
        timer = QTimer()
        timer.setSingleShot(True)
        timer.timeout.connect(loop.quit)

        def check(_task: object = None) -> None:
            if not self._active:
                loop.quit()

        self.finished.connect(check)
        timer.start(int(timeout_s * 1000))
        check()
        if self._active:
            loop.exec()
        self.finished.disconnect(check)
        timer.stop()
        return not self._active

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Cancel what can be cancelled and wait for the workers (the app is closing)."""
        self.cancel_all()
        if not self.pool.waitForDone(int(timeout_s * 1000)):
            log.warning("background work still running at exit: %s", self.activity())

    def _changed(self) -> None:
        self.activity_changed.emit(self.activity())

    def _done(self, task: Task[Any]) -> None:
        if task in self._active:
            self._active.remove(task)
        self.finished.emit(task)
        self._changed()
