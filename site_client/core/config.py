"""The site's data directory: its enrolment record, its private key, caches and outbox.

Nothing in here is ever sent anywhere; the private key never leaves this directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.errors import TesseraError
from site_client.core.intake.index import SiteIndex, load_or_create_secret


class SiteConfigError(TesseraError):
    code = "config.site"


@dataclass(frozen=True, slots=True)
class SiteConfig:
    """What enrolment established: who we are and which coordinator we trust."""

    site_id: str
    site_name: str
    federation: str
    coordinator_url: str
    fingerprint: str  # SHA-256 of the coordinator's TLS certificate (pinned)
    coordinator_key: str  # the coordinator's Ed25519 public key (signs plans and models)
    enrolled_at: float


@dataclass(frozen=True, slots=True)
class SiteDir:
    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "site.json"

    @property
    def key_file(self) -> Path:
        return self.root / "keys" / "site_ed25519.pem"

    @property
    def index_db(self) -> Path:
        """The study index (SQLite): what was imported, labels, rejections."""
        return self.root / "index.db"

    @property
    def governance_db(self) -> Path:
        """What the site was offered, decided and signed, and the tree heads it checked."""
        return self.root / "governance.db"

    @property
    def pseudonym_key(self) -> Path:
        return self.root / "keys" / "pseudonym.key"

    @property
    def pacs_inbox(self) -> Path:
        """Where objects pushed from the PACS are written before they are imported."""
        return self.root / "pacs"

    @property
    def models(self) -> Path:
        return self.root / "cache" / "models"

    @property
    def tensors(self) -> Path:
        return self.root / "cache" / "tensors"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    def ensure(self) -> None:
        for path in (
            self.root,
            self.key_file.parent,
            self.models,
            self.tensors,
            self.outbox,
            self.jobs,
        ):
            path.mkdir(parents=True, exist_ok=True)

    def open_index(self) -> SiteIndex:
        """The study index; works before enrolment (import may come first)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return SiteIndex(self.index_db, load_or_create_secret(self.pseudonym_key))

    def is_enrolled(self) -> bool:
        return self.config_file.is_file()

    def load(self) -> SiteConfig:
        try:
            return SiteConfig(**json.loads(self.config_file.read_text("utf-8")))
        except FileNotFoundError as exc:
            raise SiteConfigError(
                f"This site is not enrolled yet ({self.root}). Run 'tessera-site enrol CODE' "
                "with the invitation code from the consortium lead.",
                code="config.not_enrolled",
            ) from exc
        except (ValueError, TypeError) as exc:
            raise SiteConfigError(f"{self.config_file} is damaged: {exc}") from exc

    def save(self, config: SiteConfig) -> None:
        self.ensure()
        tmp = self.config_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(config), indent=2) + "\n", "utf-8")
        os.replace(tmp, self.config_file)
