"""What a person at the site sees and decides about the model releases it holds.

The participant receives, verifies and validates each release on its own and reports an
automatic verdict ("accepted: verification passed", with the metrics on this site's held-out
patients). A person then has the last word: they read the model card and the local metrics and
accept or refuse the release under their name. The decision is signed with the site key, kept
in the governance record and sent on the next connection; the coordinator keeps each site's
latest verdict, so a refusal replaces the automatic acceptance in the consortium's report.

Every release is verified again when it is listed or decided on (signatures, weights, tree
head, against the coordinator key pinned at enrolment): a folder altered on disk after it
arrived shows as not usable and cannot be accepted or used for predictions.

Predictions made in the app go to ``predictions/<version>/<time>/`` in the site folder: the
CSV and the saliency pictures, never anywhere else (nothing of it leaves the site).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.crypto.keys import load_private_key
from shared.errors import DataError, GovernanceError, TesseraError
from shared.protocol.messages import Dispute, ReleaseAcceptance
from shared.releases import VerifiedRelease, verify_release
from site_client.core.activity import open_governance
from site_client.core.config import SiteDir
from site_client.core.governance_link import GovernanceLink, raise_dispute
from site_client.core.releases import AUTOMATIC, acceptance, held, release_dir, verdicts

if TYPE_CHECKING:  # the model code (torch) is imported only when predicting
    from site_client.core.predict import PredictionReport, Progress, ShouldStop

__all__ = [
    "ReleaseSummary",
    "decide",
    "dispute_release",
    "load_release_summaries",
    "predict_with_release",
    "prediction_folder",
]


@dataclass(frozen=True, slots=True)
class ReleaseSummary:
    """One release held at this site, with its verification and this site's verdict."""

    version: str
    folder: Path
    run_id: str = ""
    plan_name: str = ""
    card_html: str = ""  # the model card, as the release carries it
    problem: str = ""  # why the folder no longer verifies ("" when it does)
    verdict: str = "pending"  # pending | accepted | refused
    decided_by: str = ""  # a person's name, or AUTOMATIC
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return not self.problem

    @property
    def verdict_text(self) -> str:
        """The verdict in a sentence for the release list."""
        if self.problem:
            return f"Not usable: {self.problem}"
        if self.verdict == "pending":
            return "Verified; the validation on this site's patients has not finished yet."
        who = (
            "automatically, because every check passed"
            if self.decided_by == AUTOMATIC
            else f"by {self.decided_by}"
        )
        if self.verdict == "accepted":
            return f"Accepted {who}."
        return f"Refused {who}: {self.reason}"

    @property
    def metrics_text(self) -> str:
        """This site's validation of the release, in words ("" before it ran)."""
        m = self.metrics
        if not m:
            return ""
        parts = []
        for key, label in (
            ("auc", "AUC"),
            ("accuracy", "accuracy"),
            ("sensitivity", "sensitivity"),
            ("specificity", "specificity"),
        ):
            value = m.get(key)
            parts.append(f"{label} {value:.3f}" if isinstance(value, float) else f"{label} n/a")
        n = m.get("n")
        return f"On {n} held-out image(s) of this site: " + ", ".join(parts)


def _link(site_dir: SiteDir, record: Any) -> GovernanceLink:
    return GovernanceLink(record, site_dir.load(), load_private_key(site_dir.key_file))


def _summary(
    site_dir: SiteDir, version: str, key: str, verdict: ReleaseAcceptance | None
) -> ReleaseSummary:
    folder = release_dir(site_dir, version)
    try:
        release = verify_release(folder, key)
    except TesseraError as exc:
        return ReleaseSummary(version=version, folder=folder, problem=exc.message)
    state: dict[str, Any] = {}
    if verdict is not None:
        state = {
            "verdict": "accepted" if verdict.accepted else "refused",
            "decided_by": verdict.person,
            "reason": verdict.reason,
            "metrics": dict(verdict.metrics or {}),
        }
    card = folder / "model_card.html"
    return ReleaseSummary(
        version=version,
        folder=folder,
        run_id=release.run_id,
        plan_name=release.plan.name,
        card_html=card.read_text(encoding="utf-8") if card.is_file() else "",
        **state,
    )


def load_release_summaries(site_dir: SiteDir) -> list[ReleaseSummary]:
    """Every release this site holds, newest version first, each verified again."""
    versions = held(site_dir)
    if not versions:
        return []
    config = site_dir.load()
    record = open_governance(site_dir)
    try:
        reported = verdicts(_link(site_dir, record))
    finally:
        record.close()
    return [
        _summary(site_dir, v, config.coordinator_key, reported.get(v)) for v in reversed(versions)
    ]


def decide(
    site_dir: SiteDir,
    version: str,
    *,
    accepted: bool,
    person: str,
    reason: str = "",
    now: float | None = None,
) -> ReleaseAcceptance:
    """A person's signed verdict on a release this site holds (kept, and sent to the
    coordinator on the next connection). The metrics are those of this site's validation of
    the release, when it ran; a release that no longer verifies cannot be accepted."""
    if not person.strip():
        raise GovernanceError(
            "type your name: it is signed with the decision", code="governance.person_required"
        )
    if version not in held(site_dir):
        raise GovernanceError(
            f"this site holds no release {version}; see the Models page or 'tessera-site releases'",
            code="governance.unknown_release",
        )
    config = site_dir.load()
    folder = release_dir(site_dir, version)
    release: VerifiedRelease = verify_release(folder, config.coordinator_key)
    record = open_governance(site_dir)
    try:
        link = _link(site_dir, record)
        before = verdicts(link).get(version)
        metrics = dict(before.metrics or {}) if before is not None else {}
        return acceptance(
            link,
            release,
            metrics,
            time.time() if now is None else now,
            accepted=accepted,
            reason=reason,
            person=person,
        )
    finally:
        record.close()


def dispute_release(
    site_dir: SiteDir, version: str, *, person: str, reason: str, now: float | None = None
) -> Dispute:
    """A signed dispute on a release this site received (kept, and sent to the coordinator
    on the next connection, where the consortium lead resolves it). A release that no longer
    verifies can be disputed too: that may be the very reason."""
    record = open_governance(site_dir)
    try:
        runs = [
            a["detail"]["run_id"]
            for a in record.activity()
            if a["kind"] in ("release_received", "release_rejected", "release_reported")
            and a["detail"].get("version") == version
        ]
        if not runs:
            raise GovernanceError(
                f"this site has no record of release {version}",
                code="governance.unknown_release",
            )
        return raise_dispute(
            _link(site_dir, record),
            subject="release",
            run_id=runs[-1],
            rnd=0,
            release=version,
            reason=reason,
            person=person,
            now=time.time() if now is None else now,
        )
    finally:
        record.close()


def prediction_folder(site_dir: SiteDir, version: str, now: float | None = None) -> Path:
    """A new folder for one prediction job's CSV and pictures, inside the site folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    base = site_dir.root / "predictions" / version
    folder = base / stamp
    n = 1
    while folder.exists():
        n += 1
        folder = base / f"{stamp}-{n}"
    folder.mkdir(parents=True)
    return folder


def predict_with_release(
    site_dir: SiteDir,
    version: str,
    *,
    study_uids: Sequence[str] = (),
    folder: Path | None = None,
    saliency: bool = True,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> PredictionReport:
    """Predict with a held release on imported studies (by UID) or the files of a folder; the
    CSV and saliency pictures go to a new :func:`prediction_folder`. The release is verified
    first (nothing is predicted with one that fails)."""
    from site_client.core.predict import folder_files, load_release, predict_files, study_files

    if (folder is None) == (not study_uids):
        raise DataError(
            "choose either imported studies or a folder to predict on",
            code="data.empty",
        )
    if version not in held(site_dir):
        raise GovernanceError(
            f"this site holds no release {version}", code="governance.unknown_release"
        )
    config = site_dir.load()
    loaded = load_release(
        release_dir(site_dir, version), config.coordinator_key, site_root=site_dir.root
    )
    if folder is not None:
        files, base = folder_files(folder), Path(folder)
    else:
        index = site_dir.open_index()
        try:
            files, base = study_files(index, study_uids), None
        finally:
            index.close()
    if not files:
        raise DataError(f"{folder} holds no files to predict on", code="data.empty")
    out = prediction_folder(site_dir, version)
    return predict_files(
        loaded,
        files,
        out_csv=out / "predictions.csv",
        saliency_dir=out / "saliency" if saliency else None,
        base=base,
        progress=progress,
        should_stop=should_stop,
    )
