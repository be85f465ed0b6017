"""First-run set-up, as the site app's wizard needs it: where the site keeps its data, what an
invitation code says, and enrolment as one blocking call for a worker thread.

Theory of operation: the wizard asks three questions and this module answers each one without
Qt, so the rules are tested without a window and the command line could reuse them:

1. :func:`check_data_folder`: can Tessera keep its data in this folder? A folder that already
   holds an enrolled site is simply opened again (a reinstalled app finds its site), a new
   one is created, and anything that cannot be written to is refused with what to do next.
2. :func:`check_invitation`: what does this code say? It is decoded and its expiry checked
   *before* anything is sent (``shared.identity.invitation`` is pure), so the person at the
   site can compare the coordinator's address and certificate fingerprint with what the
   consortium lead told them, out of band, before trusting them. The fingerprint is shown in
   groups of four (:func:`format_fingerprint`), short enough to read aloud on the phone.
3. :func:`enrol_site`: make the site key and redeem the code (``enrolment.enrol``), blocking,
   so the app's task runner can run it off the GUI thread.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from shared.errors import InvitationError
from shared.identity.invitation import Invitation, decode_invitation, is_expired
from site_client.core.config import SiteConfig, SiteConfigError, SiteDir

__all__ = [
    "FolderCheck",
    "InvitationCheck",
    "check_data_folder",
    "check_invitation",
    "enrol_site",
    "format_fingerprint",
    "time_left",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class FolderCheck:
    """Whether a folder can hold the site's data, in words for the person choosing it."""

    path: Path | None
    usable: bool
    message: str
    enrolled: SiteConfig | None = None  # the site already set up in that folder

    @property
    def site_dir(self) -> SiteDir:
        if self.path is None or not self.usable:
            raise SiteConfigError(self.message, code="config.data_folder")
        return SiteDir(self.path)


def _nearest_existing(path: Path) -> Path | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return None


def check_data_folder(text: str | os.PathLike[str]) -> FolderCheck:
    """Say whether Tessera can keep its key, settings and study index in ``text``.

    Reads the file system, never writes to it (the folder is created at enrolment).
    """
    raw = os.fspath(text).strip()
    if not raw:
        return FolderCheck(
            path=None,
            usable=False,
            message="Choose a folder where Tessera will keep this site's key, settings and "
            "study index.",
        )
    path = Path(raw).expanduser().absolute()
    site_dir = SiteDir(path)
    if path.exists() and not path.is_dir():
        return FolderCheck(
            path=path, usable=False, message=f"{path} is a file, not a folder: choose a folder."
        )
    if site_dir.is_enrolled():
        try:
            config = site_dir.load()
        except SiteConfigError as exc:
            return FolderCheck(path=path, usable=False, message=exc.message)
        return FolderCheck(
            path=path,
            usable=True,
            enrolled=config,
            message=f"This folder already holds the site '{config.site_name}' of the "
            f"federation '{config.federation}'. Tessera will open it; no new code is needed.",
        )
    existing = _nearest_existing(path)
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        return FolderCheck(
            path=path,
            usable=False,
            message=f"Tessera cannot write to {existing or path}. Choose a folder in your own "
            "documents, or ask IT for write access to this one.",
        )
    if existing != path:
        return FolderCheck(path=path, usable=True, message="The folder will be created.")
    if site_dir.index_db.is_file():
        return FolderCheck(
            path=path,
            usable=True,
            message="Images were already imported into this folder; they are kept.",
        )
    if any(path.iterdir()):
        return FolderCheck(
            path=path,
            usable=True,
            message="This folder is not empty. Tessera will add its own files (site.json, "
            "keys, index.db, cache) beside what is there; an empty folder is tidier.",
        )
    return FolderCheck(path=path, usable=True, message="Tessera will keep its data here.")


@dataclass(frozen=True, slots=True, kw_only=True)
class InvitationCheck:
    """What an invitation code says, or why it cannot be used (``problem``, ``code``)."""

    invitation: Invitation | None
    problem: str = ""
    code: str = ""

    @property
    def ok(self) -> bool:
        return self.invitation is not None and not self.problem

    @property
    def host(self) -> str:
        if self.invitation is None:
            return ""
        return urlsplit(self.invitation.coordinator_url).hostname or ""

    @property
    def port(self) -> int | None:
        if self.invitation is None:
            return None
        parts = urlsplit(self.invitation.coordinator_url)
        return parts.port or 443


def check_invitation(text: str, now: float) -> InvitationCheck:
    """Decode ``text`` and check its expiry at ``now``; contacts no one and never raises."""
    if not text.strip():
        return InvitationCheck(
            invitation=None,
            problem="Paste the invitation code you received from the consortium lead.",
            code="identity.invitation_missing",
        )
    try:
        invitation = decode_invitation(text)
    except InvitationError as exc:
        return InvitationCheck(invitation=None, problem=exc.message, code=exc.code)
    if is_expired(invitation, now):
        return InvitationCheck(
            invitation=invitation,
            problem="This invitation code has expired. Ask the consortium lead for a new code.",
            code="identity.invitation_expired",
        )
    return InvitationCheck(invitation=invitation)


def format_fingerprint(fingerprint: str) -> str:
    """A SHA-256 fingerprint as 16 groups of 4 upper-case hex digits, to compare by eye or
    read aloud ("A3F0 19C2 ..."); other text is returned as it is."""
    if len(fingerprint) != 64:
        return fingerprint
    upper = fingerprint.upper()
    return " ".join(upper[i : i + 4] for i in range(0, 64, 4))


def time_left(expires_at: float, now: float) -> str:
    """How long a code stays valid, in words, to the two largest units ("6 days 23 hours",
    "5 hours 10 minutes", "12 minutes"), rounded down."""
    seconds = int(expires_at - now)
    if seconds <= 0:
        return "expired"
    parts = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        n, seconds = divmod(seconds, size)
        if n or parts:
            if n:
                parts.append(f"{n} {unit}{'s' if n != 1 else ''}")
            if len(parts) == 2 or (parts and not n):
                break
    return " ".join(parts) or "less than a minute"


def enrol_site(code: str, folder: Path, site_name: str | None = None) -> SiteConfig:
    """Make this site's key and redeem ``code`` (blocking; run it off the GUI thread).

    Raises what :func:`site_client.core.enrolment.enrol` raises: ``InvitationError`` for a
    bad, used or expired code, ``ConnectionFailed`` when the coordinator cannot be reached or
    its certificate does not match the code.
    """
    from site_client.core.enrolment import enrol

    return asyncio.run(enrol(code, SiteDir(Path(folder)), (site_name or "").strip() or None))
