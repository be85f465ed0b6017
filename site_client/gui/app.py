"""The site desktop app's entry point: ``tessera-site`` (no arguments) or ``tessera-site gui``.

Start-up: the data folder is ``--data`` if given, else the one chosen last time (remembered in
the app's own settings, ``QSettings``), else the first-run wizard asks for it and enrols the
site. An enrolled folder opens the main window directly. ``--screenshots DIR`` instead renders
every page with demo data into PNG files and exits (see :mod:`site_client.gui.screenshots`).

The app's log goes to ``logs/site-app.log`` in the data folder; error dialogs point to it and
never show a stack trace.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication, QDialog, QMessageBox

from shared.errors import TesseraError
from site_client.core.config import SiteConfig, SiteDir

__all__ = ["APP_NAME", "ORGANISATION", "application", "main"]

ORGANISATION = "Tessera"
APP_NAME = "Tessera Site"
FOLDER_KEY = "site/data_folder"


def application(argv: list[str] | None = None) -> QApplication:
    """The process's ``QApplication`` (created once, with the app's names)."""
    app = QApplication.instance()
    if not isinstance(app, QApplication):
        app = QApplication(argv if argv is not None else sys.argv[:1])
    app.setOrganizationName(ORGANISATION)
    app.setApplicationName(APP_NAME)
    app.setApplicationDisplayName("Tessera")
    return app


def log_file_for(site_dir: SiteDir) -> Path:
    return site_dir.root / "logs" / "site-app.log"


def _log_to_file(site_dir: SiteDir) -> Path:
    path = log_file_for(site_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    return path


def main(
    argv: list[str] | None = None,
    *,
    data_dir: Path | None = None,
    screenshots: Path | None = None,
) -> int:
    """Run the app until its window closes; returns the process exit status."""
    if screenshots is not None:
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # no window flashes by
    app = application(argv)
    if screenshots is not None:
        from site_client.gui.screenshots import render_screenshots

        for path in render_screenshots(Path(screenshots)):
            print(path)
        return 0

    from site_client.gui.errors import ErrorReporter
    from site_client.gui.main_window import MainWindow
    from site_client.gui.pages.wizard import FirstRunWizard
    from site_client.gui.tasks import TaskRunner

    errors = ErrorReporter(app)
    runner = TaskRunner(errors, app)
    settings = QSettings(ORGANISATION, APP_NAME)
    remembered = settings.value(FOLDER_KEY, "")
    folder = Path(data_dir) if data_dir is not None else (Path(remembered) if remembered else None)

    site_dir: SiteDir | None = None
    config: SiteConfig | None = None
    if folder is not None and SiteDir(folder).is_enrolled():
        try:
            site_dir, config = SiteDir(folder), SiteDir(folder).load()
        except TesseraError as exc:
            QMessageBox.warning(None, "Tessera", f"{exc.message}\n\nError code: {exc.code}")
    if site_dir is None or config is None:
        wizard = FirstRunWizard(runner, initial_folder=folder)
        if wizard.exec() != QDialog.DialogCode.Accepted:
            runner.shutdown()
            return 0
        site_dir, config = wizard.site_dir, wizard.config
        if site_dir is None or config is None:  # the wizard cannot finish without both
            return 1
    settings.setValue(FOLDER_KEY, str(site_dir.root))
    errors.log_file = _log_to_file(site_dir)
    window = MainWindow(site_dir, config, runner)
    window.show()
    return app.exec()
