"""The participant's I/O for securely aggregated rounds (``SiteSecAgg`` over the connection).

Theory of operation: ``Participant`` hands every secure-aggregation message, each invitation
and each trained update of a securely aggregated plan to one ``SecAggRounds`` (a few one-line
hooks). The keys are advertised and shared as soon as the coordinator's setup arrives, while
the model downloads and trains; once both the update and the other sites' shares are here the
update is protected (clip, this site's share of the DP noise), masked and offered as a chunked
transfer like a plain update, and the unmasking request is answered after it. The protected
update, as summed, is kept at the site (``outbox/secagg-RUN-rROUND.safetensors``), for the
site's own records; it never leaves unmasked.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.errors import TesseraError
from shared.privacy.secagg_plan import worker_plan
from shared.protocol.messages import (
    MaskedUpdateOffer,
    Message,
    RoundInvite,
    SecAggKeys,
    SecAggSetup,
    SecAggShares,
    SecAggUnmask,
)
from shared.protocol.transfer import make_offer
from shared.tensors import decode_tensors, encode_tensors
from site_client.core.secagg_site import SiteSecAgg

if TYPE_CHECKING:
    from site_client.core.participant import Participant

log = logging.getLogger("tessera.site.secagg")


def record_path(outbox: Path, run_id: str, rnd: int) -> Path:
    """Where the site keeps the protected update it masked for (run, round)."""
    return outbox / f"secagg-{run_id}-r{rnd}.safetensors"


class SecAggRounds:
    def __init__(self, participant: Participant) -> None:
        self.p = participant
        self._invites: dict[tuple[str, int], RoundInvite] = {}
        self._attempt: SiteSecAgg | None = None
        # (run, round) -> (update, num_samples, train_loss), trained and waiting for shares
        self._trained: dict[tuple[str, int], tuple[dict[str, np.ndarray], int, float]] = {}

    @staticmethod
    def worker_plan(plan: dict[str, Any]) -> dict[str, Any]:
        return worker_plan(plan) if plan.get("secure_aggregation") else plan

    def invited(self, msg: RoundInvite) -> None:
        """An invitation this site verified and accepts."""
        if msg.plan.get("secure_aggregation"):
            self._invites = {(msg.run_id, msg.round): msg}

    async def on_message(self, msg: Message) -> None:
        p = self.p
        try:
            out = self._handle(msg)
        except TesseraError as exc:
            p.on_status(f"secure aggregation: {msg.TYPE} refused [{exc.code}]: {exc}")
            log.warning("secure aggregation: %s refused: %s (%s)", msg.TYPE, exc, exc.code)
            return
        if out is not None and p._session is not None and not p._session.closed:
            p._session.send(out)
            # "secagg" phases: keys_sent, shares_sent, unmasked (views ignore them)
            step = {"secagg_keys": "keys_sent", "secagg_shares": "shares_sent"}
            rnd = (getattr(msg, "run_id", ""), getattr(msg, "round", 0))
            p._phase("secagg", *rnd, step=step.get(out.TYPE, "unmasked"))
        await self._try_mask()
        await p._flush()

    def _handle(self, msg: Message) -> Message | None:
        p = self.p
        if isinstance(msg, SecAggSetup):
            invite = self._invites.get((msg.run_id, msg.round))
            if invite is None:
                raise TesseraError(
                    "a secure-aggregation setup for a round this site was not invited to",
                    code="privacy.secagg.unexpected",
                )
            self._attempt = SiteSecAgg(
                msg,
                invite.plan,
                site_id=p.config.site_id,
                signing_key=p.key,
                coordinator_key=p.config.coordinator_key,
            )
            return self._attempt.advertise()
        attempt = self._attempt
        key = (getattr(msg, "run_id", None), getattr(msg, "round", None))
        if attempt is None or (attempt.run_id, attempt.round) != key:
            raise TesseraError(
                "a secure-aggregation message for no open attempt", code="privacy.secagg.replayed"
            )
        if isinstance(msg, SecAggKeys):
            return attempt.share(msg)
        if isinstance(msg, SecAggShares):
            attempt.take_shares(msg)
            return None
        if isinstance(msg, SecAggUnmask):
            response = attempt.unmask(msg)
            self._attempt = None
            for tid in [t for t in p._uploads if t.startswith("s-")]:
                p._uploads.pop(tid, None)
            return response
        return None

    async def trained(self, invite: RoundInvite, outcome: Any) -> None:
        """The worker's update for a securely aggregated round: kept here (never offered
        plain) until it can be masked."""
        p = self.p
        raw = await asyncio.to_thread(outcome.update_path.read_bytes)
        update = {k: np.array(v, dtype=np.float32) for k, v in decode_tensors(raw).items()}
        outcome.update_path.unlink(missing_ok=True)
        self._trained = {
            (invite.run_id, invite.round): (update, outcome.num_samples, outcome.train_loss)
        }
        await self._try_mask()
        await p._flush()
        if invite.round >= 2:  # as the plain path: validate the model this round started from
            p._validating = asyncio.ensure_future(
                p._validate(invite.run_id, invite.round - 1, invite.plan, p._model_path(invite))
            )

    async def _try_mask(self) -> None:
        p, attempt = self.p, self._attempt
        if attempt is None or attempt.shares is None or attempt.masked:
            return
        trained = self._trained.get((attempt.run_id, attempt.round))
        if trained is None or p._session is None or p._session.closed:
            return
        update, num_samples, loss = trained
        try:
            protected = attempt.protect({k: v.copy() for k, v in update.items()})
            masked, data = await asyncio.to_thread(attempt.mask, protected)
        except TesseraError as exc:
            p.on_status(f"secure aggregation: cannot mask the update [{exc.code}]: {exc}")
            return
        record = record_path(p.dir.outbox, attempt.run_id, attempt.round)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_bytes(encode_tensors(protected))
        digest = hashlib.sha256(data).hexdigest()
        offer = make_offer("s-" + digest, data, p.limits.chunk_size, sha256=digest)
        msg = MaskedUpdateOffer(
            run_id=attempt.run_id,
            round=attempt.round,
            masked=masked,
            update=offer.body(),
            num_samples=num_samples,
            train_loss=loss,
        )
        p._uploads[offer.transfer_id] = (msg, data)
        p._session.send(msg)
        p.on_status(f"round {attempt.round}: sending the masked update ({len(data)} bytes)")
        p._phase(
            "uploading",
            attempt.run_id,
            attempt.round,
            train_loss=loss,
            num_samples=num_samples,
            bytes=len(data),
            masked=True,
        )
