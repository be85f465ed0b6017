"""The self-test's Qt part: the main window, rendered off screen, page by page.

``tessera-site --self-test`` adds :func:`check_main_window` to the checks of
:mod:`site_client.core.selftest` (which stays free of Qt). It builds the real main window over
the self-test's temporary site folder (with the synthetic images the import check put there),
lets the Data page load its data through the task runner, and renders every page and every
tab of the Data page into an image: a page that renders blank or reports an error fails the
check. Nothing appears on screen: with no display (or ``QT_QPA_PLATFORM=offscreen``) Qt's
offscreen platform draws into memory, and on a desktop the window is laid out with
``WA_DontShowOnScreen``, so the platform plugin the app would really use is the one tested.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from typing import Any

__all__ = ["check_main_window", "distinct_colours"]

WAIT_S = 60.0
MIN_COLOURS = 8  # a blank or half-drawn page has one or two; a real page dozens


def _choose_platform() -> None:
    """Offscreen unless a display is there to use (must run before the QApplication)."""
    if os.environ.get("QT_QPA_PLATFORM"):
        return
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"


def distinct_colours(image: Any, step: int = 4) -> int:
    """Colours on a grid of pixels of a ``QImage``: 1 for a blank image."""
    return len(
        {
            image.pixel(x, y)
            for x in range(0, image.width(), step)
            for y in range(0, image.height(), step)
        }
    )


def check_main_window(ctx: Any) -> str:
    """``ctx`` is the self-test's :class:`~site_client.core.selftest.SelfTestContext`."""
    _choose_platform()
    from PySide6.QtCore import Qt

    from site_client.core.config import SiteConfig, SiteDir
    from site_client.gui.app import application
    from site_client.gui.errors import ErrorReporter
    from site_client.gui.main_window import MainWindow
    from site_client.gui.tasks import TaskRunner

    app = application()
    site_dir = ctx.site_dir if ctx.site_dir is not None else SiteDir(ctx.work / "gui-site")
    site_dir.save(
        SiteConfig(
            site_id="self-test",
            site_name="Self-test Hospital",
            federation="Self-test federation",
            coordinator_url="wss://coordinator.invalid:8443",
            fingerprint=hashlib.sha256(b"tessera self-test").hexdigest(),
            coordinator_key="",
            enrolled_at=time.time(),
        )
    )
    errors = ErrorReporter()
    errors.dialogs = False
    runner = TaskRunner(errors)
    window = MainWindow(site_dir, site_dir.load(), runner)
    window.setAttribute(Qt.WidgetAttribute.WA_DontShowOnScreen, True)
    try:
        window.show()
        if not runner.wait_idle(WAIT_S):
            raise RuntimeError(f"the window's background work did not finish: {runner.activity()}")
        rendered: list[str] = []
        for page_number, (title, page, _tip) in enumerate(window.pages):
            window.show_page(page_number)
            views: list[tuple[str, int | None]] = [(title, None)]
            if page is window.data_page:  # its tabs are pages of their own
                tabs = window.data_page.tabs
                views = [
                    (f"{title} / {tabs.tabText(i).replace('&', '')}", i)
                    for i in range(tabs.count())
                ]
            for name, tab in views:
                shown = page
                if tab is not None:
                    window.data_page.tabs.setCurrentIndex(tab)
                    shown = window.data_page.tabs.currentWidget()
                app.processEvents()
                image = shown.grab().toImage()  # the page alone: the frame always has colours
                if image.isNull() or distinct_colours(image) < MIN_COLOURS:
                    raise RuntimeError(f"the page {name!r} rendered blank")
                rendered.append(name)
        if errors.last is not None:
            raise RuntimeError(f"the window reported an error: {errors.last.title}")
        size = window.size()
    finally:
        window.close()
        runner.shutdown()
    return (
        f"{len(rendered)} pages rendered on the {app.platformName()!r} platform "
        f"({size.width()}x{size.height()})"
    )
