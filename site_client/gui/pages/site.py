"""The "This site" page: who this site is in the federation and whom it trusts.

Everything here comes from the enrolment record (``site.json``): the federation, this site's
name and ID, the coordinator's address and pinned certificate fingerprint, and where the data
folder and the private key are. It answers "which federation is this computer part of?" for
IT staff without a command line.
"""

from __future__ import annotations

from datetime import datetime

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFormLayout, QGroupBox, QLabel, QVBoxLayout, QWidget

from site_client.core.config import SiteConfig, SiteDir
from site_client.core.onboarding import format_fingerprint

__all__ = ["SitePage"]


def _value(text: str, tip: str = "", *, rich: bool = False) -> QLabel:
    label = QLabel(text)
    label.setTextFormat(Qt.TextFormat.RichText if rich else Qt.TextFormat.PlainText)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    if tip:
        label.setToolTip(tip)
    return label


class SitePage(QWidget):
    def __init__(self, site_dir: SiteDir, config: SiteConfig, parent: QWidget | None = None):
        super().__init__(parent)
        identity = QGroupBox("This site")
        form = QFormLayout(identity)
        form.addRow("Federation:", _value(config.federation))
        form.addRow("Site name:", _value(config.site_name, "How the others see this site."))
        form.addRow("Site ID:", _value(config.site_id, "The coordinator's name for this site."))
        enrolled = datetime.fromtimestamp(config.enrolled_at)
        form.addRow("Enrolled:", _value(f"{enrolled:%d %B %Y, %H:%M}"))
        trust = QGroupBox("The coordinator this site trusts")
        tform = QFormLayout(trust)
        tform.addRow("Address:", _value(config.coordinator_url))
        tform.addRow(
            "Certificate fingerprint:",
            _value(
                f"<tt>{format_fingerprint(config.fingerprint)}</tt>",
                "Tessera talks only to a coordinator presenting this exact certificate.",
                rich=True,
            ),
        )
        storage = QGroupBox("On this computer")
        sform = QFormLayout(storage)
        sform.addRow("Data folder:", _value(str(site_dir.root)))
        sform.addRow(
            "Site key:",
            _value(
                str(site_dir.key_file),
                "This site's private key. It signs what the site sends and never leaves this "
                "computer; keep the folder backed up.",
            ),
        )
        layout = QVBoxLayout(self)
        layout.addWidget(identity)
        layout.addWidget(trust)
        layout.addWidget(storage)
        layout.addStretch(1)
