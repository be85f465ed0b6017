"""The PACS receiver's settings as the site app keeps them: AE title, port, who may send.

Kept in ``pacs.json`` in the site's data folder so the receiver comes back with the same
settings after a restart (a PACS is configured once with this AE title and port, and expects
them not to change). The rules on AE titles and ports are the receiver's own
(:class:`site_client.core.intake.pacs.PacsReceiver` checks them when it starts); this module
only reads and writes the file and turns the app's text box into a list.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from site_client.core.config import SiteDir
from site_client.core.intake.pacs import PacsReceiver

__all__ = ["PacsSettings", "load_pacs_settings", "parse_callers", "save_pacs_settings"]

#: Listen on every network connection (a PACS on another machine), or this computer only.
ALL_INTERFACES = "0.0.0.0"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True, kw_only=True)
class PacsSettings:
    ae_title: str = "TESSERA"
    port: int = 11112
    allowed_aes: tuple[str, ...] = field(default=())
    host: str = ALL_INTERFACES

    def receiver(self, site_dir: SiteDir) -> PacsReceiver:
        """A receiver with these settings (raises ``PacsReceiverError`` for bad ones)."""
        return PacsReceiver.for_site(
            site_dir,
            ae_title=self.ae_title,
            port=self.port,
            allowed_aes=list(self.allowed_aes),
            host=self.host,
        )


def parse_callers(text: str) -> tuple[str, ...]:
    """AE titles from a text box, one per line or separated by commas (AE titles may
    contain spaces, so spaces do not separate), blanks dropped, duplicates once."""
    seen: dict[str, None] = {}
    for part in re.split(r"[,\n;]", text):
        title = part.strip()
        if title:
            seen.setdefault(title, None)
    return tuple(seen)


def _file(site_dir: SiteDir) -> Path:
    return site_dir.root / "pacs.json"


def load_pacs_settings(site_dir: SiteDir) -> PacsSettings:
    """The saved settings, or the defaults when none were saved or the file is damaged."""
    try:
        raw = json.loads(_file(site_dir).read_text("utf-8"))
        return PacsSettings(
            ae_title=str(raw["ae_title"]),
            port=int(raw["port"]),
            allowed_aes=tuple(str(a) for a in raw["allowed_aes"]),
            host=str(raw.get("host", ALL_INTERFACES)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return PacsSettings()


def save_pacs_settings(site_dir: SiteDir, settings: PacsSettings) -> None:
    path = _file(site_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    data = asdict(settings)
    data["allowed_aes"] = list(settings.allowed_aes)
    tmp.write_text(json.dumps(data, indent=2) + "\n", "utf-8")
    os.replace(tmp, path)
