"""``tessera-site gui --screenshots DIR``: every page built so far, with demo data, as PNGs.

For the documentation and for review: the renderings are of the real widgets driven through
their own code paths (the import runs through the Import tab and the task runner, the labels
file through the Labels box), on a small synthetic federation (``shared.synthetic``; no real
patient) generated in a temporary folder that is deleted afterwards. The demo export mixes
two scanners and a few files that cannot be used, and its labels file has a row that matches
no image and one with a label that is not 0 or 1, so every report has something to show.
The site is given a demo enrolment record (no coordinator is contacted); the PACS receiver
is switched on on this computer only, on a free port, and off again.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import tempfile
import time
from pathlib import Path

from PySide6.QtWidgets import QApplication, QWidget

from shared.identity.invitation import Invitation, encode_invitation, new_token
from shared.synthetic import generate_federation
from site_client.core.config import SiteConfig, SiteDir
from site_client.core.pacs_settings import LOOPBACK

__all__ = ["render_screenshots"]

WAIT_S = 60.0
SIZE = (1180, 760)


def _demo_export(root: Path, seed: int) -> tuple[Path, Path]:
    """A folder as a hospital might export it, and its labels file."""
    fed = generate_federation(
        root / "generated",
        sites=2,
        seed=seed,
        images_per_site=[36, 24],
        test_images=0,
        image_size=96,
    )
    export = root / "export"
    export.mkdir()
    rows: list[str] = []
    for i, site in enumerate(fed.sites):
        shutil.move(str(site.dicom_dir), export / f"scanner-{'ab'[i]}")
        lines = site.labels_csv.read_text("utf-8").splitlines()
        header, body = lines[0], lines[1:]
        rows.extend(body)
    first = next((export / "scanner-a").rglob("*.dcm"))
    extra = export / "from-cd"
    extra.mkdir()
    (extra / "README.TXT").write_text("Exported by the PACS for the Tessera demo.\n")
    (extra / "IMG0001.dcm").write_bytes(first.read_bytes()[:1500])  # a cut-off copy
    labels = root / "labels.csv"
    bad = ["1.2.826.0.1.3680043.8.498.1,SYN-UNKNOWN,1", rows[0].rsplit(",", 1)[0] + ",maybe"]
    labels.write_text("\n".join([header, *rows[1:], *bad]) + "\n", "utf-8")
    return export, labels


def _demo_config() -> SiteConfig:
    return SiteConfig(
        site_id="demo-site-7f3a",
        site_name="Demo General Hospital",
        federation="Demo chest X-ray federation",
        coordinator_url="wss://coordinator.demo-consortium.example:8443",
        fingerprint=hashlib.sha256(b"tessera demo certificate").hexdigest(),
        coordinator_key="",
        enrolled_at=time.time(),
    )


def _demo_code() -> str:
    return encode_invitation(
        Invitation(
            coordinator_url="wss://coordinator.demo-consortium.example:8443",
            fingerprint=hashlib.sha256(b"tessera demo certificate").hexdigest(),
            token=new_token(),
            federation="Demo chest X-ray federation",
            expires_at=int(time.time()) + 7 * 86400,
        )
    )


def _save(widget: QWidget, path: Path) -> Path:
    QApplication.processEvents()
    if not widget.grab().save(str(path), "PNG"):
        raise OSError(f"cannot write {path}")
    return path


def render_screenshots(out_dir: Path, *, seed: int = 7) -> list[Path]:
    """Render the wizard and every page of the main window into ``out_dir``; returns the
    files written, in page order."""
    from site_client.gui.errors import ErrorReporter
    from site_client.gui.main_window import MainWindow
    from site_client.gui.pages.wizard import FirstRunWizard
    from site_client.gui.tasks import TaskRunner

    out_dir.mkdir(parents=True, exist_ok=True)
    errors = ErrorReporter()
    errors.dialogs = False
    runner = TaskRunner(errors)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="tessera-screenshots-") as tmp:
        root = Path(tmp)
        export, labels = _demo_export(root, seed)

        wizard = FirstRunWizard(runner, initial_folder=root / "Tessera site data")
        wizard.show()
        written.append(_save(wizard, out_dir / "01-setup-data-folder.png"))
        wizard.next()
        wizard.invitation_page.code.setPlainText(_demo_code())
        wizard.invitation_page.site_name.setText("Demo General Hospital")
        wizard.invitation_page.confirm.setChecked(True)
        written.append(_save(wizard, out_dir / "02-setup-invitation.png"))
        wizard.close()

        site_dir = SiteDir(root / "site")
        site_dir.save(_demo_config())
        window = MainWindow(site_dir, site_dir.load(), runner)
        window.resize(*SIZE)
        window.show()
        page = window.data_page
        page.import_panel.start_import(export)
        _wait(runner)
        page.import_panel.load_labels(labels)
        _wait(runner)
        page.tabs.setCurrentIndex(0)
        written.append(_save(window, out_dir / "03-data-import-and-labels.png"))
        page.tabs.setCurrentIndex(1)
        page.studies.select_first()
        _wait(runner)
        written.append(_save(window, out_dir / "04-data-studies.png"))
        page.tabs.setCurrentIndex(2)
        written.append(_save(window, out_dir / "05-data-summary.png"))
        page.tabs.setCurrentIndex(3)
        page.pacs.callers.setPlainText("PACS1\nCT_SCANNER_2")
        page.pacs.host.setCurrentIndex(page.pacs.host.findData(LOOPBACK))
        page.pacs.port.setValue(_free_port())
        page.pacs.start()
        _wait(runner)
        written.append(_save(window, out_dir / "06-data-pacs-receiver.png"))
        page.pacs.stop_now()
        window.show_page(1)
        written.append(_save(window, out_dir / "07-this-site.png"))
        window.close()
    if errors.last is not None:  # a page would show an error instead of the demo data
        raise RuntimeError(f"the demo failed: {errors.last.title}: {errors.last.text}")
    return written


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _wait(runner) -> None:
    if not runner.wait_idle(WAIT_S):
        raise TimeoutError(f"the demo's background work did not finish: {runner.activity()}")
