"""Releases at the site: receive, verify and keep them, and report local acceptance.

Theory of operation
-------------------
The coordinator offers each release of a run this site took part in as one packed payload
(``ReleaseNotice``; :func:`shared.releases.pack_release`). The participant downloads it like a
model (resumable, ``releases/X.Y.part``) and hands the bytes to :func:`install`, which unpacks
only the known file names (no paths from the peer), checks the folder with
:func:`shared.releases.verify_release` and the coordinator key pinned at enrolment, and only then
moves it to ``releases/X.Y/`` under the site directory. A release that fails any check is never
kept; the refusal is noted in the governance activity (``release_rejected``) with the check's
code, so the same payload is not fetched again.

Local acceptance (this slice): once a release is verified, the participant runs the plan's
validation on the site's own held-out data with the release's weights and sends a signed
``ReleaseAcceptance`` with the metrics only, ``accepted`` true because verification passed.
A person can later refuse it (``tessera-site releases refuse X.Y --reason ... --person ...``):
the refusal is signed, kept, and sent on every connection; the coordinator keeps each site's
latest verdict.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import releases as layout
from shared.crypto.signing import sign
from shared.errors import GovernanceError, ReleaseError
from shared.protocol import signed
from shared.protocol.messages import ReleaseAcceptance, TransferOffer
from shared.releases import VerifiedRelease, verify_release
from site_client.core.config import SiteDir
from site_client.core.governance_link import GovernanceLink

AUTOMATIC = "Release verification (automatic)"


@dataclass(frozen=True, slots=True)
class ReleaseDownload:
    """A release being received: what the notice said, and where its bytes go."""

    version: str
    run_id: str
    offer: TransferOffer
    part: Path


def releases_dir(site_dir: SiteDir) -> Path:
    return site_dir.root / "releases"


def release_dir(site_dir: SiteDir, version: str) -> Path:
    return releases_dir(site_dir) / layout.check_version(version)


def wanted(site_dir: SiteDir, link: GovernanceLink, version: str, offer: TransferOffer) -> bool:
    """Whether to fetch this offer: not already kept, and not a payload refused before."""
    if release_dir(site_dir, version).is_dir():
        return False
    return not any(
        a["kind"] == "release_rejected" and a["detail"].get("sha256") == offer.sha256
        for a in link.record.activity()
    )


def install(
    site_dir: SiteDir, link: GovernanceLink, download: ReleaseDownload, data: bytes, now: float
) -> VerifiedRelease:
    """Unpack, verify and keep a received release; raises ``ReleaseError`` (noted as
    ``release_rejected``) if any check fails, leaving nothing behind."""
    root = releases_dir(site_dir)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{download.version}.", dir=root))
    try:
        for name, content in layout.unpack_release(data).items():
            (staging / name).write_bytes(content)  # names are from FILE_NAMES only
        verified = verify_release(staging, link.config.coordinator_key)
        if (verified.version, verified.run_id) != (download.version, download.run_id):
            raise ReleaseError(
                f"the coordinator offered release {download.version} of run "
                f"{download.run_id} but sent release {verified.version} of run "
                f"{verified.run_id}",
                code="release.wrong_release",
            )
        target = release_dir(site_dir, download.version)
        os.replace(staging, target)
    except ReleaseError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        link.record.note(
            "release_rejected",
            now,
            version=download.version,
            run_id=download.run_id,
            sha256=download.offer.sha256,
            code=exc.code,
            reason=exc.message,
        )
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    link.record.note(
        "release_received",
        now,
        version=download.version,
        run_id=download.run_id,
        weights_sha256=_sha256(verified.weights),
        folder=str(target),
    )
    return verify_release(target, link.config.coordinator_key)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def acceptance(
    link: GovernanceLink,
    release: VerifiedRelease,
    metrics: dict[str, Any],
    now: float,
    *,
    accepted: bool = True,
    reason: str = "",
    person: str = AUTOMATIC,
) -> ReleaseAcceptance:
    """Sign this site's verdict on a verified release and keep it (``release_reported``);
    the participant sends it, again on every connection (the coordinator records it once)."""
    if not accepted and not reason.strip():
        raise GovernanceError(
            "say why this site refuses the release; the reason goes to the consortium lead",
            code="governance.reason_required",
        )
    metrics = json.loads(json.dumps(metrics))
    body = {
        "version": release.version,
        "run_id": release.run_id,
        "weights_sha256": _sha256(release.weights),
        "accepted": accepted,
        "metrics": metrics,
        "reason": " ".join(reason.split()),
        "person": " ".join(person.split()),
    }
    fields = signed.release_acceptance_fields(
        federation=link.config.federation, site_id=link.config.site_id, **body
    )
    message = ReleaseAcceptance(**body, signature=sign(link.key, signed.RELEASE_ACCEPTANCE, fields))
    link.record.note("release_reported", now, **message.body())
    return message


def verdicts(link: GovernanceLink) -> dict[str, ReleaseAcceptance]:
    """This site's latest signed verdict on each release, by version."""
    out: dict[str, ReleaseAcceptance] = {}
    for a in link.record.activity():
        if a["kind"] == "release_reported":
            out[a["detail"]["version"]] = ReleaseAcceptance(**a["detail"])
    return out


def held(site_dir: SiteDir) -> list[str]:
    """Versions kept under ``releases/``, oldest version first."""
    root = releases_dir(site_dir)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(names, key=lambda v: tuple(int(x) for x in v.split(".")))


__all__ = [
    "AUTOMATIC",
    "ReleaseDownload",
    "acceptance",
    "held",
    "install",
    "release_dir",
    "releases_dir",
    "verdicts",
    "wanted",
]
