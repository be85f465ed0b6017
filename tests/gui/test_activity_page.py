"""The Activity page on a real site's records (governance record and study index), its
export, and both new pages in the main window."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from site_client.core.activity import open_governance
from site_client.gui.main_window import MainWindow
from site_client.gui.pages.activity import ActivityPage
from site_client.gui.pages.governance import GovernancePage
from site_client.gui.tasks import TaskRunner

WAIT_MS = 20_000


def _decide_and_import(site) -> None:
    """What a morning at the site leaves behind: an import, then a signed approval."""
    index = site.site_dir.open_index()
    try:
        run = index.start_run("/exports/cd-0042", time.time() - 120)
        index.finish_run(run, "done", {"indexed": 40, "unchanged": 0, "rejected": 2}, time.time())
    finally:
        index.close()
    governance = open_governance(site.site_dir)
    try:
        governance.decide_plan(
            site.plan_hash,
            approve=True,
            reason="",
            person="Dr. Ada Byron",
            key=site.site_key,
            now=time.time() + 1,
        )
    finally:
        governance.close()


def test_the_timeline_is_newest_first_and_exports(
    qtbot, runner: TaskRunner, governed_site, tmp_path: Path
) -> None:
    _decide_and_import(governed_site)
    page = ActivityPage(governed_site.site_dir, runner)
    qtbot.addWidget(page)
    page.show()
    assert not page.export_button.isEnabled()
    with qtbot.waitSignal(page.loaded, timeout=WAIT_MS):
        page.refresh()
    short = governed_site.plan_hash[:12]
    lines = page.lines()
    assert len(lines) == len(page.entries) == 4
    assert lines[0].endswith(f" Dr. Ada Byron approved plan 'chest-xray v2' ({short})")
    assert lines[0][:5] == page.entries[0].line()[:5]  # "14:02"
    assert lines[1].endswith(
        "Imported images from /exports/cd-0042: 40 files indexed, 0 unchanged, 2 not usable"
    )
    assert {line.split(" ", 1)[1] for line in lines[2:]} == {
        f"The coordinator offered plan 'chest-xray v2' ({short}) for approval",
        f"The coordinator offered charter version 1 ({page.entries[-1].details['sha256'][:12]})",
    }
    day = page.tree.topLevelItem(0)
    assert day.child(0).text(2) == "yes, with the site key" and day.child(1).text(2) == ""

    with qtbot.waitSignal(page.exported, timeout=WAIT_MS) as blocker:
        page.export_to(tmp_path / "activity.csv")
    assert blocker.args[0] == tmp_path / "activity.csv"
    with (tmp_path / "activity.csv").open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["what"] for r in rows] == [e.text for e in page.entries]
    assert rows[0]["person"] == "Dr. Ada Byron" and rows[0]["signed"] == "yes"
    assert "Saved 4 entries" in page.message.text()

    with qtbot.waitSignal(page.exported, timeout=WAIT_MS):
        page.export_to(tmp_path / "activity.json")
    data = json.loads((tmp_path / "activity.json").read_text("utf-8"))
    assert [e["kind"] for e in data["activity"]] == [e.kind for e in page.entries]

    blocker_file = tmp_path / "a-file"
    blocker_file.write_text("")
    with qtbot.waitSignal(runner.finished, timeout=WAIT_MS):
        page.export_to(blocker_file / "activity.csv")
    assert "Nothing was exported" in page.message.text()
    assert "Choose a folder you can write to" in page.message.text()
    assert runner.errors.last is None  # shown on the page, not as a second dialog


def test_the_main_window_has_both_pages(qtbot, runner: TaskRunner, governed_site) -> None:
    window = MainWindow(governed_site.site_dir, governed_site.site_dir.load(), runner)
    qtbot.addWidget(window)
    window.show()
    titles = [window.sidebar.item(i).text() for i in range(window.sidebar.count())]
    assert titles == ["Data", "Governance", "Participation", "Models", "Activity", "This site"]
    assert all(window.sidebar.item(i).toolTip() for i in range(window.sidebar.count()))
    assert window.sidebar.item(1).toolTip().endswith("(Ctrl+2)")
    # each page reads its record when it is shown
    with qtbot.waitSignal(window.governance_page.view_loaded, timeout=WAIT_MS):
        window.show_page(1)
    assert isinstance(window.stack.currentWidget(), GovernancePage)
    assert window.governance_page.view.charter.version == 1
    with qtbot.waitSignal(window.activity_page.loaded, timeout=WAIT_MS):
        window.show_page(4)
    assert window.stack.currentWidget() is window.activity_page
    assert len(window.activity_page.entries) == 2  # the charter and the plan offered
    runner.wait_idle(10)
