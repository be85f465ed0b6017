"""The one task runner: work off the GUI thread, results back on it, cancel, one error place."""

from __future__ import annotations

import threading

import pytest
from PySide6.QtWidgets import QMessageBox, QWidget

from shared.errors import DataError
from site_client.gui.errors import ErrorReporter, describe_error
from site_client.gui.tasks import TaskRunner

WAIT_MS = 10_000


def test_work_runs_off_the_gui_thread_and_reports_back_on_it(qtbot, runner: TaskRunner) -> None:
    gui = threading.get_ident()
    seen: list[tuple[str, object, int]] = []
    activity: list[str] = []
    runner.activity_changed.connect(activity.append)

    def work(ctx) -> int:
        for i in range(1, 1001):
            ctx.progress(i, 1000, f"{i} of 1000 things")
        return threading.get_ident()

    task = runner.run(
        "Counting",
        work,
        on_progress=lambda p: seen.append(("progress", p.done, threading.get_ident())),
        on_done=lambda worker: seen.append(("done", worker, threading.get_ident())),
    )
    assert task.running and runner.activity() == "Counting"
    with qtbot.waitSignal(task.finished, timeout=WAIT_MS):
        pass
    assert task.state == "done" and task.result != gui  # it ran on a worker thread
    assert all(thread == gui for _, _, thread in seen)  # callbacks ran on the GUI thread
    progress = [done for kind, done, _ in seen if kind == "progress"]
    assert progress[-1] == 1000  # the last step always arrives...
    assert len(progress) < 100  # ...but 1000 calls in a tight loop are throttled
    assert progress == sorted(progress)
    assert seen[-1][0] == "done"
    assert "Counting: 1000 of 1000 things" in activity
    assert activity[-1] == "" and runner.active() == []


def test_cancel_asks_the_work_to_stop(qtbot, runner: TaskRunner) -> None:
    started, release = threading.Event(), threading.Event()

    def work(ctx) -> str:
        started.set()
        while not ctx.should_stop():
            release.wait(0.005)  # a worker doing something, checking for cancel between steps
        return "stopped early"

    done: list[str] = []
    task = runner.run("Waiting", work, on_done=done.append, cancellable=True)
    assert started.wait(5)
    task.cancel()
    assert runner.activity() == "Waiting: stopping..."
    with qtbot.waitSignal(task.finished, timeout=WAIT_MS):
        pass
    assert task.state == "cancelled" and done == ["stopped early"]


def test_a_task_that_cannot_be_cancelled_ignores_cancel(qtbot, runner: TaskRunner) -> None:
    task = runner.run("Quick", lambda ctx: ctx.should_stop())
    task.cancel()
    with qtbot.waitSignal(task.finished, timeout=WAIT_MS):
        pass
    assert task.state == "done" and task.result is False


def test_failures_go_to_the_one_error_place_unless_handled(qtbot, runner: TaskRunner) -> None:
    reported = []
    runner.errors.reported.connect(reported.append)

    def bad_labels(_ctx):
        raise DataError("The labels file has no label column.", code="data.labels")

    task = runner.run("Loading labels", bad_labels)
    with qtbot.waitSignal(task.finished, timeout=WAIT_MS):
        pass
    assert task.state == "failed" and isinstance(task.error, DataError)
    assert [(m.title, m.text, m.code) for m in reported] == [
        ("A problem with the data", "The labels file has no label column.", "data.labels")
    ]
    # a caller that shows the problem itself says so, and nothing is reported twice
    handled = []
    task = runner.run("Loading labels", bad_labels, on_failed=lambda e: handled.append(e) or True)
    with qtbot.waitSignal(task.finished, timeout=WAIT_MS):
        pass
    assert len(handled) == 1 and len(reported) == 1


def test_a_bug_is_shown_without_its_traceback(qtbot, runner: TaskRunner, tmp_path) -> None:
    runner.errors.log_file = tmp_path / "site-app.log"
    task = runner.run("Reading the study list", lambda _ctx: {}["missing"])
    with qtbot.waitSignal(task.finished, timeout=WAIT_MS):
        pass
    message = runner.errors.last
    assert message is not None and message.code == "app.unexpected"
    assert message.title == "Something unexpected went wrong"
    assert "while reading the study list (KeyError)" in message.text
    assert str(tmp_path / "site-app.log") in message.text
    assert "Traceback" not in message.text and "missing" not in message.text


def test_a_failing_callback_is_reported_too(qtbot, runner: TaskRunner) -> None:
    task = runner.run("Adding", lambda _ctx: 1, on_done=lambda _v: 1 / 0)
    with qtbot.waitSignal(task.finished, timeout=WAIT_MS):
        pass
    assert runner.errors.last is not None and "(ZeroDivisionError)" in runner.errors.last.text


def test_callbacks_of_a_deleted_widget_are_dropped(qtbot, runner: TaskRunner) -> None:
    owner = QWidget()
    release = threading.Event()
    called = []

    def work(_ctx) -> int:
        release.wait(5)
        return 1

    task = runner.run("Late", work, on_done=called.append, owner=owner)
    owner.deleteLater()
    qtbot.waitUntil(lambda: not _alive(owner), timeout=WAIT_MS)
    release.set()
    with qtbot.waitSignal(task.finished, timeout=WAIT_MS):
        pass
    assert called == [] and task.state == "done"


def _alive(widget: QWidget) -> bool:
    from shiboken6 import Shiboken

    return Shiboken.isValid(widget)


def test_the_error_dialog_does_not_block(qtbot) -> None:
    parent = QWidget()
    qtbot.addWidget(parent)
    errors = ErrorReporter()
    errors.dialog_parent = parent
    errors.report(DataError("The folder is empty.", code="data.empty"), "importing images")
    boxes = parent.findChildren(QMessageBox)
    assert len(boxes) == 1  # shown, and we got here: it did not block the event loop
    assert (boxes[0].windowTitle(), boxes[0].text()) == (
        "A problem with the data",
        "The folder is empty.",
    )
    assert boxes[0].informativeText() == "Error code: data.empty"
    errors.close_dialogs()


@pytest.mark.parametrize(
    ("code", "title"),
    [
        ("identity.invitation_used", "This code has already been used"),
        ("net.unreachable", "Cannot reach the coordinator"),
        ("pacs.port_in_use", "The PACS receiver cannot start"),
        ("storage.write", "Cannot write to the data folder"),
    ],
)
def test_titles_name_the_problem(code: str, title: str) -> None:
    from shared.errors import TesseraError

    assert describe_error(TesseraError("m", code=code)).title == title
