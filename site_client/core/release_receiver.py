"""Releases as a site's participant receives them, beside ``participant.py``.

Theory of operation: a ``ReleaseNotice`` lists the releases this site may have (:mod:`.releases`
decides which it wants); each one not yet kept, nor refused before, is downloaded like a model
into a part file (resumable), verified against the pinned coordinator key and kept under
``releases/X.Y/`` (:func:`.releases.install`). The site then runs the plan's validation with the
release's weights on its own held-out data, once its own round work is done, and sends the
signed ``ReleaseAcceptance`` with the metrics. What it refuses is reported and never installed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import TYPE_CHECKING, Any

from shared.errors import TesseraError
from shared.protocol.messages import ReleaseNotice
from site_client.core import local_state
from site_client.core import releases as site_releases
from site_client.core.downloads import open_download

if TYPE_CHECKING:
    from site_client.core.participant import Participant


class ReleaseReceiver:
    """Release notices, downloads and acceptance checks for ``Participant``
    (``participant.releases``)."""

    def __init__(self, participant: Participant) -> None:
        self.participant = participant

    def on_notice(self, msg: ReleaseNotice) -> None:
        """Fetch each offered release this site does not hold yet (resuming a part)."""
        p = self.participant
        session = p._session
        assert session is not None
        for version, run_id, offer in msg.offers():
            if offer.transfer_id in p._downloads or not site_releases.wanted(
                p.dir, p.governance, version, offer
            ):
                continue
            root = site_releases.releases_dir(p.dir)
            root.mkdir(parents=True, exist_ok=True)
            part = root / f"{version}.{offer.sha256[:16]}.part"
            release = site_releases.ReleaseDownload(version, run_id, offer, part)
            try:
                download = open_download(session, release, offer, part)
            except TesseraError as exc:
                p.on_status(f"cannot fetch release {version}: {exc}")
                continue
            p.on_status(f"receiving release {version} of run {run_id}")
            p._downloads[offer.transfer_id] = download

    def arrived(self, download: site_releases.ReleaseDownload) -> None:
        """Verify and keep a downloaded release, then check it on this site's data."""
        p = self.participant
        data = download.part.read_bytes()
        download.part.unlink(missing_ok=True)
        try:
            verified = site_releases.install(p.dir, p.governance, download, data, time.time())
        except TesseraError as exc:
            p.on_status(f"ALERT: release {download.version} refused: {exc}")
            p._phase("release_rejected", download.run_id, detail_code=exc.code, reason=str(exc))
            return
        p.on_status(f"release {download.version} verified and kept in {verified.root}")
        p._phase("release_received", download.run_id, version=download.version)
        p._spawn(self._accept(verified))

    async def _accept(self, verified: Any) -> None:
        """Run the plan's validation with the release's weights on this site's held-out
        data and send the signed metrics (accepted: the release passed verification)."""
        p = self.participant
        if p._validating is not None and not p._validating.done():
            await asyncio.shield(p._validating)
        if p._training is not None and not p._training.done():
            await asyncio.shield(p._training)
        from shared.releases import WEIGHTS

        weights = verified.root / WEIGHTS
        metrics: dict[str, Any] = {}
        try:
            metrics = await p.trainer.validate(
                f"release-{verified.version}",
                {
                    "plan": verified.plan.to_dict(),
                    "model_path": str(weights),
                    "model_sha256": hashlib.sha256(verified.weights).hexdigest(),
                    **p._data_job(),
                    "cache_dir": str(p.dir.tensors),
                    "data_seed": 0,
                    # FedBN: judged with the layers this site trained in that run
                    "state_dir": str(local_state.run_folder(p.dir.root, verified.run_id)),
                    "round": verified.plan.rounds,
                },
            )
        except TesseraError as exc:
            p.on_status(f"acceptance validation of release {verified.version} failed: {exc}")
        message = site_releases.acceptance(p.governance, verified, metrics, time.time())
        if p._session is not None and not p._session.closed:
            p._session.send(message)
            await p._flush()
