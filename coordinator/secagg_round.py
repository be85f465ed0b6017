"""One securely aggregated round at the coordinator: phases, deadlines, relays. Pure.

Theory of operation
-------------------
When a run's plan has ``secure_aggregation``, each attempt at a round is one
:class:`SecAggRound` around ``shared.privacy.secagg.SecAggServer`` (Bonawitz et al., CCS 2017,
figure 4). The server adapter feeds it what the sites sent plus ``now`` and carries out the
actions it returns (send a message to a site, leave a site out, the round's aggregate, the
round failed); it does no I/O and reads no clock.

Phases, each with a deadline and a defined outcome::

    advertise  setup sent to the round's sites; each answers with its keys. Closes when all
               have, or at the deadline: the sites that did not are left out; fewer than the
               threshold fails the attempt. Everyone who advertised gets the key list.
    share      each advertiser deals encrypted shares. Closes when all have, or at the
               deadline: the others are left out (they were never part of any mask); fewer
               than the threshold fails the attempt. Each sharer gets the shares dealt to it.
    mask       sharers train, then send their masked vectors as chunked transfers; each is
               added to the running sum on arrival (``SecAggServer``: one ring vector, no
               individual update is kept). Closed by the round engine (``close_masking``):
               when every selected site has answered or the round deadline has passed.
    unmask     the coordinator-signed unmask request goes to the survivors; a sharer that
               sent nothing is recovered from the survivors' shares. Closes when all
               survivors answered, or at the deadline with at least the threshold: the
               unmasked sum, divided by the number of survivors (equal weighting, as the
               plan requires), is the round's mean update. Fewer fails the attempt.

A failed attempt is retried by the engine with fresh keys: every attempt's configuration
binds a fresh attempt id, so no message of one attempt is of use in another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.crypto.signing import sign
from shared.errors import SecAggMessageRejected, TesseraError
from shared.privacy.quantise import Quantiser
from shared.privacy.secagg import SecAggConfig, SecAggServer, masked_digest
from shared.privacy.secagg_plan import (
    BITS,
    SETUP_PURPOSE,
    quantiser_clip,
    unflatten,
    vector_length,
)
from shared.protocol.messages import (
    MaskedUpdateOffer,
    Message,
    SecAggKeys,
    SecAggSetup,
    SecAggShares,
    SecAggUnmask,
    SecAggUnmaskResponse,
)

__all__ = ["Failed", "LeftOut", "SecAggRound", "Send", "Unmasked"]

Layout = Mapping[str, tuple[tuple[int, ...], str]]


@dataclass(frozen=True, slots=True)
class Send:
    site: str
    message: Message


@dataclass(frozen=True, slots=True)
class LeftOut:
    """``site`` missed a phase before sharing: it is not part of this attempt."""

    site: str
    round: int
    reason: str


@dataclass(frozen=True, slots=True)
class Unmasked:
    """The attempt's result: the survivors' mean update (``layout``'s entries)."""

    round: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    mean: dict[str, np.ndarray]
    num_samples: int
    train_loss: float


@dataclass(frozen=True, slots=True)
class Failed:
    round: int
    reason: str


SecAggAction = Send | LeftOut | Unmasked | Failed


class SecAggRound:
    """The coordinator's side of one attempt at a securely aggregated round."""

    def __init__(
        self,
        *,
        run_id: str,
        round: int,
        attempt: str,
        sites: tuple[str, ...],
        site_keys: Mapping[str, str],
        signing_key: Ed25519PrivateKey,
        layout: Layout,
        plan: Any,
        now: float,
        phase_s: float,
    ) -> None:
        sites = tuple(sorted(sites))
        self.run_id, self.round, self.layout = run_id, round, dict(layout)
        self.phase_s = phase_s
        threshold, length = len(sites) // 2 + 1, vector_length(layout)
        clip = quantiser_clip(plan, length, threshold)
        self.config = SecAggConfig(
            run_id=f"{run_id}:{attempt}",
            round=round,
            sites=sites,
            threshold=threshold,
            vector_length=length,
            quantiser=Quantiser(clip_norm=clip, max_sites=len(sites), bits=BITS),
        )
        keys = {s: site_keys[s] for s in sites}
        self.server = SecAggServer(self.config, signing_key=signing_key, site_keys=keys)
        q = self.config.quantiser
        unsigned = SecAggSetup(
            run_id=run_id,
            round=round,
            config={
                "run_id": self.config.run_id,
                "round": round,
                "sites": list(sites),
                "threshold": self.config.threshold,
                "vector_length": self.config.vector_length,
                "bits": q.bits,
                "clip_norm": q.clip_norm,
                "max_sites": q.max_sites,
            },
            site_keys=keys,
            signature="-",
        )
        self.setup = SecAggSetup(
            **{
                **unsigned.body(),
                "signature": sign(signing_key, SETUP_PURPOSE, unsigned.signed_fields()),
            }
        )
        self.phase = "advertise"
        self.deadline: float | None = now + phase_s
        self.advertised: set[str] = set()
        self.shared: set[str] = set()
        self._offers: dict[str, MaskedUpdateOffer] = {}
        self._received: dict[str, tuple[int, float]] = {}  # site -> (samples, loss)
        self._responded: set[str] = set()
        self.gone: set[str] = set()
        self.done = False

    @property
    def sites(self) -> tuple[str, ...]:
        return self.config.sites

    @property
    def vector_bytes(self) -> int:
        return self.config.vector_length * np.dtype(self.config.quantiser.dtype).itemsize

    # -- inputs ------------------------------------------------------------------------

    def receive(self, site: str, msg: Message, now: float) -> list[SecAggAction]:
        """Keys, shares or an unmask response from ``site``. Raises
        ``SecAggMessageRejected`` (the caller answers with its code) and changes nothing then."""
        self._check_envelope(site, msg)
        if isinstance(msg, SecAggKeys):
            ads = msg.to_secagg()
            if len(ads) != 1 or ads[0].site != site:
                raise _rejected(site, "must send exactly its own key advertisement", "forged")
            self._once(site, msg, self.advertised)
            self.server.receive_advertisement(ads[0])
            self.advertised.add(site)
        elif isinstance(msg, SecAggShares):
            shares = msg.to_secagg()
            if any(s.sender != site for s in shares):
                raise _rejected(site, "sent shares in another site's name", "forged")
            self._once(site, msg, self.shared)
            self.server.receive_shares(shares)
            self.shared.add(site)
        elif isinstance(msg, SecAggUnmaskResponse):
            response = msg.to_secagg()
            if response.site != site:
                raise _rejected(site, "answered in another site's name", "forged")
            self._once(site, msg, self._responded)
            self.server.receive_unmask_response(response)
            self._responded.add(site)
        else:
            raise _rejected(site, f"sent an unexpected {msg.TYPE}", "unexpected")
        return self.tick(now)

    def masked_offer(self, site: str, msg: MaskedUpdateOffer) -> None:
        """Check an offer of a masked vector before its bytes are taken."""
        self._check_envelope(site, msg)
        masked = msg.to_secagg()
        if self.phase != "mask" or site not in self.shared or masked.site != site:
            raise _rejected(
                site,
                "offered a masked update it may not send now (not a sharer, or late)",
                "unexpected",
            )
        if site in self._received:
            raise _rejected(site, "offered a second masked update", "replayed")
        if msg.update_offer.size != self.vector_bytes:
            raise SecAggMessageRejected(
                f"The masked update from {site} has {msg.update_offer.size} bytes; this round "
                f"takes {self.vector_bytes}. It was not used.",
                code="update.shape",
                site=site,
            )
        self._offers[site] = msg

    def masked_received(self, site: str, data: bytes | memoryview) -> tuple[str, Any, int]:
        """Add a complete masked vector to the running sum; returns its digest, its signed
        ``MaskedInput`` and the site's sample count. The bytes are not kept."""
        msg = self._offers.pop(site, None)
        if msg is None:
            raise _rejected(site, "sent a masked update that was not offered", "unexpected")
        dtype = np.dtype(self.config.quantiser.dtype)
        vector = np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
        masked = msg.to_secagg()
        self.server.receive_masked_input(masked, vector)
        self._received[site] = (msg.num_samples, msg.train_loss)
        return masked_digest(vector), masked, msg.num_samples

    def close_masking(self, now: float) -> list[SecAggAction]:
        """The engine closed the round: ask the survivors to unmask."""
        if self.done or self.phase != "mask":
            return self._fail(f"the round closed while secure aggregation was at {self.phase}")
        try:
            request = self.server.unmask_request()
        except TesseraError as exc:
            return self._fail(str(exc))
        self.phase, self.deadline = "unmask", now + self.phase_s
        wire = SecAggUnmask(run_id=self.run_id, round=self.round, request=request.fields())
        return [Send(s, wire) for s in request.survivors]

    def site_gone(self, site: str, now: float) -> list[SecAggAction]:
        """``site`` disconnected: the phases stop waiting for it. A site that had shared its
        keys but sent no masked update is left out of the engine's wait; its masks are
        removed with the survivors' shares."""
        if self.done or site not in self.sites:
            return []
        self.gone.add(site)
        out: list[SecAggAction] = []
        if site in self.shared and site not in self._received:
            out.append(LeftOut(site, self.round, "disconnected after sharing its keys"))
        return out + self.tick(now)

    def tick(self, now: float) -> list[SecAggAction]:
        if self.done:
            return []
        late = self.deadline is not None and now >= self.deadline
        if self.phase == "advertise" and (late or self.advertised | self.gone >= set(self.sites)):
            try:
                ads = self.server.advertisements()
            except TesseraError as exc:
                return self._fail(str(exc))
            wire = SecAggKeys(
                run_id=self.run_id, round=self.round, advertisements=[a.fields() for a in ads]
            )
            out: list[SecAggAction] = [
                LeftOut(s, self.round, "did not send its keys in time")
                for s in self.sites
                if s not in self.advertised
            ]
            self.phase, self.deadline = "share", now + self.phase_s
            return out + [Send(s, wire) for s in sorted(self.advertised)]
        if self.phase == "share" and (late or self.shared | self.gone >= self.advertised):
            if len(self.shared) < self.config.threshold:
                return self._fail(
                    f"only {len(self.shared)} sites shared their keys in time, "
                    f"{self.config.threshold} needed"
                )
            out = [
                LeftOut(s, self.round, "did not share its keys in time")
                for s in sorted(self.advertised - self.shared)
            ]
            for s in sorted(self.shared):
                shares = self.server.shares_for(s)
                out.append(
                    Send(
                        s,
                        SecAggShares(
                            run_id=self.run_id,
                            round=self.round,
                            shares=[m.fields() for m in shares],
                        ),
                    )
                )
            self.phase, self.deadline = "mask", None
            return out
        survivors = set(self.server.survivors)
        if self.phase == "unmask" and (late or self._responded | self.gone >= survivors):
            try:
                total = self.server.aggregate()
            except TesseraError as exc:
                return self._fail(str(exc))
            self.done = True
            request = self.server.unmask_request()
            n = len(request.survivors)
            counts = [self._received[s] for s in request.survivors]
            return [
                Unmasked(
                    round=self.round,
                    survivors=request.survivors,
                    dropped=request.dropped,
                    mean=unflatten(total / n, self.layout),
                    num_samples=sum(c[0] for c in counts),
                    train_loss=sum(c[1] for c in counts) / n,
                )
            ]
        return []

    def next_deadline(self) -> float | None:
        return None if self.done else self.deadline

    # -- helpers -----------------------------------------------------------------------

    def _check_envelope(self, site: str, msg: Message) -> None:
        run_id, rnd = getattr(msg, "run_id", None), getattr(msg, "round", None)
        if (run_id, rnd) != (self.run_id, self.round) or self.done:
            raise SecAggMessageRejected(
                f"A {msg.TYPE} from {site} for run {run_id!r} round {rnd!r} is not for the "
                "open securely aggregated round: stale or replayed. It was not used.",
                code="privacy.secagg.replayed",
                site=site,
            )
        if site not in self.sites:
            raise _rejected(site, "is not a site of this round", "unexpected")

    @staticmethod
    def _once(site: str, msg: Message, seen: set[str]) -> None:
        """A second copy is a replay whenever it comes, also after its phase has closed."""
        if site in seen:
            raise _rejected(site, f"sent a second {msg.TYPE} in this round", "replayed")

    def _fail(self, reason: str) -> list[SecAggAction]:
        self.done = True
        return [Failed(self.round, f"secure aggregation failed: {reason}")]


def _rejected(site: str, what: str, kind: str) -> SecAggMessageRejected:
    return SecAggMessageRejected(
        f"{site} {what}; the message was not used.", code=f"privacy.secagg.{kind}", site=site
    )
