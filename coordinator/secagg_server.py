"""The coordinator's I/O for securely aggregated rounds, beside ``server.py``.

Theory of operation: ``CoordinatorServer`` hands every secure-aggregation event to one
``SecAggLink`` (a few one-line hooks), which drives the pure :class:`SecAggRound` of the open
attempt and carries out its actions: messages to sites, sites left out of the round (the
engine stops waiting for them), the unmasked aggregate committed as the round's model, or a
failed attempt (the engine retries it). Masked vectors arrive as chunked transfers held in
memory until complete, then go into the attempt's running sum and are dropped: nothing of an
individual update is written to disk, and the coordinator never holds one unmasked. The
provenance log gets what the plain path logs: each masked input received (digest, signature)
and the aggregate computed (from which survivors, with which dropped sites recovered).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from coordinator.aggregation import RoundResult
from coordinator.engine import Aggregate, OpenRound
from coordinator.secagg_round import Failed, LeftOut, SecAggAction, SecAggRound, Send, Unmasked
from shared.aggregation import (
    ServerOptState,
    apply_aggregate,
    initial_state,
    layout_of,
    make_strategy,
    server_optimiser,
    upload_layout,
)
from shared.errors import StorageError, TesseraError
from shared.protocol.messages import (
    ErrorMessage,
    MaskedUpdateOffer,
    Message,
    SecAggKeys,
    SecAggShares,
    SecAggUnmaskResponse,
    UpdateAccepted,
)
from shared.protocol.session import ChunkReceived, TransferComplete
from shared.tensors import decode_tensors, encode_tensors

if TYPE_CHECKING:
    from coordinator.server import Connection, CoordinatorServer

log = logging.getLogger("tessera.coordinator.secagg")

SECAGG_MESSAGES = (SecAggKeys, SecAggShares, SecAggUnmaskResponse, MaskedUpdateOffer)
# How long each key phase (advertise, share) and the unmask phase wait for the sites, as a
# share of the plan's round deadline: keys are small and sent before training.
PHASE_SHARE = 0.25


class SecAggLink:
    def __init__(self, server: CoordinatorServer) -> None:
        self.server = server
        self.round: SecAggRound | None = None
        self._sent: set[str] = set()
        # (site, transfer id) -> the masked vector's bytes so far
        self._buffers: dict[tuple[str, str], bytearray] = {}

    @property
    def on(self) -> bool:
        return self.server.plan is not None and self.server.plan.secure_aggregation

    # -- round life ----------------------------------------------------------------------

    async def open(self, action: OpenRound) -> None:
        """A new attempt: its configuration, sent to the round's connected sites."""
        s = self.server
        run, plan = s.run, s.plan
        assert run is not None and plan is not None
        self.round, self._sent, self._buffers = None, set(), {}
        try:
            base = await s._model_arrays(run.model_digest)
            strategy = make_strategy(
                plan.aggregation, plan.aggregation_params, weighting=plan.weighting
            )
            keys = {}
            for site in action.selected:
                record = s.fed.store.site(site)
                if record is not None:
                    keys[site] = record.public_key
            sites = tuple(sorted(keys))
            attempt = SecAggRound(
                run_id=run.run_id,
                round=action.round,
                attempt=os.urandom(8).hex(),
                sites=sites,
                site_keys=keys,
                signing_key=s.key,
                layout=upload_layout(strategy, layout_of(base)),
                plan=plan,
                now=s.clock(),
                phase_s=plan.round_deadline_s * PHASE_SHARE,
            )
        except TesseraError as exc:
            log.error("cannot set up secure aggregation for round %d: %s", action.round, exc)
            self._apply([Failed(action.round, str(exc))])
            return
        if s.run is None or s.run.run_id != run.run_id or s.run.current_round != action.round:
            return  # the round moved on meanwhile
        self.round = attempt
        log.info(
            "round %d: secure aggregation over %s (threshold %d)",
            action.round,
            ", ".join(attempt.sites),
            attempt.config.threshold,
        )
        for site in attempt.sites:
            self.invited(site)
        s._wake.set()  # the phase deadline counts from now

    def invited(self, site: str) -> None:
        """``site`` was (re)invited: send it the attempt's setup once, after its invitation.
        A site that is not part of the attempt does not take part in this round."""
        s, attempt = self.server, self.round
        conn = s.connections.get(site)
        if attempt is None or conn is None:
            return  # the setup goes out when the attempt is ready
        if site not in attempt.sites:
            if s.engine is not None:
                s._apply(s.engine.site_declined(site, attempt.round, s.clock()))
            return
        if site in self._sent or attempt.phase != "advertise":
            return
        self._sent.add(site)
        conn.session.send(attempt.setup)
        s._spawn(s._flush(conn))

    def close(self, action: Aggregate) -> None:
        """The engine closed the round: unmask what arrived."""
        attempt = self.round
        if attempt is None or attempt.round != action.round:
            self._apply([Failed(action.round, "no secure-aggregation attempt is open")])
            return
        self._apply(attempt.close_masking(self.server.clock()))

    def retried(self) -> None:
        self.round, self._sent, self._buffers = None, set(), {}

    def site_gone(self, site: str) -> None:
        """A site of the attempt disconnected before sending its masked update: the round
        stops waiting for it (its masks are removed with the others' shares)."""
        s, attempt = self.server, self.round
        if attempt is None or site not in attempt.sites or s.engine is None:
            return
        self._buffers = {k: v for k, v in self._buffers.items() if k[0] != site}
        self._apply(attempt.site_gone(site, s.clock()))

    def tick(self, now: float) -> None:
        if self.round is not None:
            self._apply(self.round.tick(now))

    def next_deadline(self) -> float | None:
        return self.round.next_deadline() if self.round is not None else None

    # -- messages and transfers ----------------------------------------------------------

    def on_message(self, conn: Connection, msg: Message, now: float) -> None:
        s, attempt, site = self.server, self.round, conn.site_id or ""
        try:
            if attempt is None:
                raise TesseraError(
                    f"No securely aggregated round is open; this {msg.TYPE} was not used.",
                    code="privacy.secagg.unexpected",
                )
            if isinstance(msg, MaskedUpdateOffer):
                attempt.masked_offer(site, msg)
                offer = msg.update_offer
                conn.session.expect_transfer(offer, b"")
                self._buffers[(site, offer.transfer_id)] = bytearray()
                return
            actions = attempt.receive(site, msg, now)
        except TesseraError as exc:
            log.warning("%s from %s rejected: %s (%s)", msg.TYPE, site, exc, exc.code)
            if s.run is not None:
                s.fed.store.log(
                    "secagg_message_rejected",
                    now,
                    run_id=s.run.run_id,
                    round=getattr(msg, "round", 0),
                    site_id=site,
                    type=msg.TYPE,
                    code=exc.code,
                )
            conn.session.send(ErrorMessage(code=exc.code, message=exc.message, ref=msg.TYPE))
            return
        self._apply(actions)

    def on_chunk(self, conn: Connection, event: ChunkReceived) -> bool:
        buffer = self._buffers.get((conn.site_id or "", event.transfer_id))
        if buffer is None:
            return False
        buffer += event.data
        conn.session.ack(event.transfer_id)
        return True

    def on_complete(self, conn: Connection, event: TransferComplete) -> bool:
        s, site = self.server, conn.site_id or ""
        data = self._buffers.pop((site, event.offer.transfer_id), None)
        if data is None:
            return False
        attempt = self.round
        now = s.clock()
        try:
            if attempt is None:
                raise TesseraError("the round closed", code="privacy.secagg.unexpected")
            digest, masked, samples = attempt.masked_received(site, bytes(data))
        except TesseraError as exc:
            log.warning("masked update from %s rejected: %s (%s)", site, exc, exc.code)
            conn.session.send(
                ErrorMessage(code=exc.code, message=exc.message, ref=MaskedUpdateOffer.TYPE)
            )
            return True
        finally:
            del data
        assert s.run is not None and s.engine is not None
        s.fed.store.log(
            "masked_update_received",
            now,
            run_id=s.run.run_id,
            round=attempt.round,
            site_id=site,
            digest=digest,
            sha256=event.offer.sha256,
            num_samples=samples,
            base_model=s.run.model_digest,
            # With these, the site's signature (purpose secagg.masked) checks offline.
            secagg_run_id=masked.run_id,
            config_digest=masked.config_digest,
            signature=masked.signature,
        )
        log.info("masked update from %s for round %d added to the sum", site, attempt.round)
        conn.session.send(
            UpdateAccepted(run_id=s.run.run_id, round=attempt.round, sha256=event.offer.sha256)
        )
        s._apply(s.engine.update_stored(site, attempt.round, now))
        return True

    # -- actions -------------------------------------------------------------------------

    def _apply(self, actions: list[SecAggAction]) -> None:
        s = self.server
        for action in actions:
            if isinstance(action, Send):
                s.send_to(action.site, action.message)
            elif isinstance(action, LeftOut):
                log.info("site %s is left out of this round: it %s", action.site, action.reason)
                if s.engine is not None:
                    s._apply(s.engine.site_declined(action.site, action.round, s.clock()))
            elif isinstance(action, Unmasked):
                s._spawn(self._commit(action))
            elif isinstance(action, Failed):
                log.warning("round %d: %s", action.round, action.reason)
                self.round = None
                if s.engine is not None:
                    s._apply(s.engine.aggregate_failed(action.round, action.reason, s.clock()))

    async def _commit(self, result: Unmasked) -> None:
        """The survivors' mean update becomes the round's model, as the plain path does."""
        s = self.server
        run, plan, engine = s.run, s.plan, s.engine
        assert run is not None and plan is not None and engine is not None
        rnd = result.round
        try:
            strategy = make_strategy(
                plan.aggregation, plan.aggregation_params, weighting=plan.weighting
            )
            base = await s._model_arrays(run.model_digest)
            state_in = s._opt_state_before(run.run_id, rnd, strategy)
            optimiser = server_optimiser(strategy)
            state = None
            if optimiser is not None:
                if state_in is None:
                    state = initial_state(upload_layout(strategy, layout_of(base)), optimiser)
                else:
                    raw = await asyncio.to_thread(s.fed.blobs.get, state_in)
                    state = ServerOptState.from_arrays(decode_tensors(raw))
            new, after = apply_aggregate(strategy, base, result.mean, state)
            model = encode_tensors(new)
            opt = encode_tensors(after.to_arrays()) if after is not None else None
            state_out, digest = await asyncio.to_thread(s._persist, RoundResult(model, opt))
            now = s.clock()
            events = {
                e["detail"].get("site_id"): e["detail"]
                for e in s.fed.store.events("masked_update_received")
                if e["detail"].get("run_id") == run.run_id and e["detail"].get("round") == rnd
            }
            s.fed.store.log(
                "secure_aggregate_computed",
                now,
                run_id=run.run_id,
                round=rnd,
                model=digest,
                survivors=list(result.survivors),
                dropped=list(result.dropped),
                inputs=[
                    {
                        "site_id": site,
                        "digest": events.get(site, {}).get("digest"),
                        "num_samples": events.get(site, {}).get("num_samples", 0),
                        "signature": events.get(site, {}).get("signature"),
                    }
                    for site in result.survivors
                ],
            )
            s.fed.store.commit_round(
                run.run_id,
                rnd,
                digest,
                len(result.survivors),
                result.train_loss,
                rnd >= plan.rounds,
                now,
                opt_state=state_out,
            )
        except TesseraError as exc:
            log.error("secure aggregation of round %d failed: %s", rnd, exc)
            if isinstance(exc, StorageError):
                s._pause(exc)
            s._apply(engine.aggregate_failed(rnd, str(exc), s.clock()))
            return
        self.round = None
        s.run = s.fed.store.run(run.run_id)
        s._fresh = (digest, model)
        log.info(
            "round %d securely aggregated from %d sites (%d recovered after dropping out)",
            rnd,
            len(result.survivors),
            len(result.dropped),
        )
        s._apply(engine.aggregate_committed(rnd, s.clock()))
        s._wake.set()
