"""The coordinator's asyncio adapter: websockets in, round engine decisions out.

Theory of operation: one ``CoordinatorSession`` per site connection turns frames into
events; this module does the I/O those events need (database, blob files, signatures) and
feeds the outcome to the ``RoundEngine``, whose actions it then carries out. Everything runs
on one event loop; CPU-heavy and blocking steps (update validation, aggregation, hashing and
fsyncing large blobs) run in worker threads, and a durable write is always awaited before the
acknowledgement it backs is sent. Nothing here decides policy: that is the engine's job.

Per round, the global model is encoded, hashed and signed once: aggregation hands the new
model's bytes and digest straight to the next round's offer, which every invited site shares.
The model is also decoded once per round, in a worker thread while the sites download and
train: its layout checks each update and its weights go into the aggregate. Round models go
to the sites one at a time, in the order asked (``MODEL_TURN_WAIT_S``), so the first sites
train and upload while the last ones download. Once every expected site has offered its
update, each update is folded into the round's mean right after its receipt check
(``coordinator.aggregation.RoundFold``; those stored earlier are folded from disk
meanwhile), so aggregating does not read and hash every update again; offers, uploads and
those checks are ``coordinator.update_intake``'s. Each
round's phases (model encode, aggregate, persist, commit) are timed with a monotonic clock and
appended to ``timings.jsonl`` in the data directory when the round is committed
(``shared.phases``). The round path does not poll; the supervisor's timer only picks up runs
started from the admin CLI (another process) and fires deadlines.

Peers are limited before they cost anything (``coordinator.limits``, whose verdicts this
adapter carries out): a connection must fit the budget of unidentified connections and
identify within its deadline, with frames of at most 64 KiB until it does; every connection's
messages are metered (a fast sender is slowed, a flood disconnected); failed enrolments and
sign-ins are throttled per address (an enrolled site's sign-in never is); and update uploads
take a slot each, queued in turn when too many arrive at once (the site simply waits for its
``TransferAccept``).

A failed disk write (or an aggregation past ``aggregate_timeout_s``) pauses the run
(``coordinator.pause``): logged, shown by ``status``, no more round decisions acted on until
a restart resumes from the database.

Releases (``tessera-coordinator release``, another process) reach only the sites that took part
in their run (:func:`coordinator.release.may_receive`): a ``ReleaseNotice`` after ``Welcome``
and whenever one is published lists each release a site may have with an offer of it packed as
one payload (built once per release, then kept); a request for a release's transfer from any
other site is refused. A site's signed ``ReleaseAcceptance`` is checked and logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from coordinator import governance, release
from coordinator.aggregation import (
    RoundResult,
    aggregate_round,
)
from coordinator.engine import (
    Action,
    Aggregate,
    FinishRun,
    InviteSite,
    OpenRound,
    RetryRound,
    RoundEngine,
)
from coordinator.federation import Federation
from coordinator.he_server import HE_MESSAGES, HELink
from coordinator.heterogeneity import shift_entry
from coordinator.limits import ALLOWED, MessageRate, PeerLimits
from coordinator.pause import Pause, clear_pause, write_pause
from coordinator.secagg_server import SECAGG_MESSAGES, SecAggLink
from coordinator.store import RunRecord
from coordinator.update_intake import UpdateIntake, Upload, store_chunk
from shared.aggregation import (
    StrategyConfig,
    make_strategy,
    server_optimiser,
)
from shared.crypto.signing import sign, verify
from shared.crypto.tls import server_ssl_context
from shared.errors import StorageError, TesseraError, TransferError
from shared.identity.invitation import token_digest
from shared.phases import TIMINGS_FILE, PhaseClock, RoundTimings, append_timings
from shared.plan import TrainingPlan
from shared.privacy.he_rounds import is_encrypted
from shared.protocol import signed
from shared.protocol.codec import DEFAULT_LIMITS, Limits, encode
from shared.protocol.messages import (
    Authenticate,
    CharterSignature,
    ChunkAck,
    DataSummaryReport,
    Dispute,
    Enrol,
    ErrorMessage,
    HeadRequest,
    Message,
    PlanDecision,
    ReleaseAcceptance,
    ReleaseNotice,
    RoundDecline,
    RoundInvite,
    RunFinished,
    TransferAccept,
    TransferOffer,
    UpdateOffer,
    ValidationReport,
)
from shared.protocol.session import (
    ChunkReceived,
    Closed,
    CoordinatorSession,
    Event,
    MessageReceived,
    PeerViolation,
    TransferComplete,
    TransferFailed,
)
from shared.protocol.transfer import ChunkFrames, make_offer
from shared.tensors import decode_tensors

log = logging.getLogger("tessera.coordinator")

# What a site is told when a failed disk write has paused the run (coordinator.pause).
PAUSED_MESSAGE = (
    "The coordinator cannot write to its disk and has paused the run. Your site's work is "
    "kept and is asked for again once the operator has fixed the disk."
)
# Longest wait for a peer to take what we send before a close (it may have stopped reading).
FLUSH_TIMEOUT_S = 2.0
# Round models are sent one site at a time, in the order the sites ask, each at the full
# speed of the coordinator's link and processor: the first site then has its model in a
# fraction of the time and trains and uploads while the others download, instead of every
# site waiting for all the downloads to end together. A transfer waits for its turn at most
# this long, so a site whose link stalls holds the others back no longer than that.
MODEL_TURN_WAIT_S = 2.0


@dataclass
class Connection:
    ws: ServerConnection
    session: CoordinatorSession
    site_id: str | None = None
    uploads: dict[str, Upload] = field(default_factory=dict)
    peer: str = ""  # the peer's address: failed sign-ins and waiting connections count per peer
    meter: MessageRate | None = None
    # Offers waiting for an upload slot, by transfer id (``UploadSlots``).
    queued: dict[str, UpdateOffer] = field(default_factory=dict)
    # Chunk acknowledgements this peer may still send for free: one per chunk sent to it.
    ack_credit: int = 0


@dataclass
class RoundModel:
    """The global model of the open round: encoded, hashed, signed and framed once per round."""

    round: int
    data: bytes | memoryview  # read-only
    offer: TransferOffer
    signature: str
    frames: ChunkFrames = field(init=False)

    def __post_init__(self) -> None:
        self.frames = ChunkFrames(self.offer, self.data)


class CoordinatorServer:
    def __init__(
        self,
        fed: Federation,
        *,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
        admin_poll_s: float = 0.5,
        monotonic: Callable[[], float] = time.monotonic,
        peer_limits: PeerLimits = PeerLimits(),
        aggregate_timeout_s: float = 3600.0,
    ) -> None:
        self.fed = fed
        self.limits = limits
        self.clock = clock
        self.monotonic = monotonic  # phase timings only; decisions use ``clock``
        self.admin_poll_s = admin_poll_s
        self.key = fed.signing_key()
        self.public_key = fed.public_key()
        self.fingerprint = fed.fingerprint()
        self.connections: dict[str, Connection] = {}
        self.peer_limits = peer_limits
        self.identity_guard = peer_limits.identity_guard(clock())
        self.pending = peer_limits.connection_budget()  # keyed by websocket
        self.intake = UpdateIntake(self, peer_limits.upload_slots())
        self._conns: dict[ServerConnection, Connection] = {}  # every open connection
        self.run: RunRecord | None = None
        self.plan: TrainingPlan | None = None
        self.plan_signature = ""
        self.engine: RoundEngine | None = None
        self.model: RoundModel | None = None
        self.secagg = SecAggLink(self)  # securely aggregated rounds
        self.he = HELink(self)  # homomorphically encrypted runs
        self._final: RoundModel | None = None  # the finished run's model, offered for validation
        self._governance_seen: tuple[int, str | None] | None = None
        self._releases_seen: tuple[str, ...] = ()
        # Packed releases by transfer id: (version, run id, payload and offer).
        self._release_packs: dict[str, tuple[str, str, RoundModel]] = {}
        self.timings: list[RoundTimings] = []  # this process's rounds, also in timings.jsonl
        self._timer: PhaseClock | None = None
        # The model aggregation just stored (read-only bytes or view).
        self._fresh: tuple[str, bytes | memoryview] | None = None
        # The round's model decoded (digest, task): for update checks and the aggregate.
        self._decoded: tuple[str, asyncio.Task[dict[str, np.ndarray]]] | None = None
        # The open round's fold (aggregation.RoundFold), and the sample counts offered for
        # ((run, round), {site: count}) that fix its weights.
        self._model_turn = asyncio.Lock()  # one round model transfer at a time
        self.port: int | None = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shift_seen: tuple[str, dict[str, Any]] | None = None  # (run, last logged)
        self.paused: Pause | None = None  # a failed disk write stopped the run (pause.py)
        self.aggregate_timeout_s = aggregate_timeout_s
        self._aggregating: tuple[int, float] | None = None  # (round, started at)

    # -- lifecycle -----------------------------------------------------------------------

    async def serve(self, ready: Callable[[int], None] | None = None) -> None:
        cfg = self.fed.config
        ssl_ctx = None
        if not cfg.insecure_loopback:
            ssl_ctx = server_ssl_context(self.fed.paths.tls_cert, self.fed.paths.tls_key)
        async with serve(
            self._handle,
            cfg.host,
            cfg.port,
            ssl=ssl_ctx,
            max_size=self.limits.max_frame_bytes,
            ping_interval=20,
            ping_timeout=20,
            # A peer that does not answer our close (a kicked flooder, a dead link) is dropped
            # after 2 s rather than the default 10 s, which would hold its socket meanwhile.
            close_timeout=2,
            # permessage-deflate stays available to clients that ask (bounded by max_size as
            # it inflates); Tessera sites do not ask: float weights barely compress, and
            # zlib over a 20 MB model costs seconds per round (participant.py).
        ) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self.fed.paths.port_file.write_text(str(self.port))
            log.info("serving %s on port %d", cfg.federation, self.port)
            self._resume_after_pause()
            if ready is not None:
                ready(self.port)
            await self._supervise()

    def _resume_after_pause(self) -> None:
        """A start clears the pause a failed disk write left (``coordinator.pause``): the
        run carries on from the database, and pauses again if the disk still fails."""
        try:
            previous = clear_pause(self.fed.paths.root)
        except OSError as exc:
            log.error("cannot clear the pause marker: %s", exc)
            return
        if previous is not None:
            log.warning(
                "resuming run %s, paused at round %d: %s (%s)",
                previous.run_id,
                previous.round,
                previous.reason,
                previous.code,
            )

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def _supervise(self) -> None:
        """Pick up runs started from the admin CLI and fire round deadlines."""
        while not self._stopping.is_set():
            if self.engine is None or self.engine.finished:
                self._load_run()
            self._governance_changed()
            self._releases_changed()
            now = self.clock()
            if self.engine is not None:
                self._apply(self.engine.tick(now))
                self.secagg.tick(now)
                self.he.tick(now)
                self._check_aggregation(now)
            self._close_overdue(now)
            timeout = self.admin_poll_s
            deadlines = [self.engine.next_deadline() if self.engine else None]
            deadlines.append(self.pending.next_deadline())
            deadlines.append(self.secagg.next_deadline())
            deadlines.append(self.he.next_deadline())
            for deadline in deadlines:
                if deadline is not None:
                    timeout = max(0.0, min(timeout, deadline - now))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    def _check_aggregation(self, now: float) -> None:
        """Aggregation has a deadline too (the engine's round deadline stops while it runs):
        past ``aggregate_timeout_s`` -- a hung disk, a stuck worker thread -- the run is
        paused with that reason instead of waiting for ever. Should the work finish later,
        what it committed is consistent; a restart carries on from the database."""
        started, state = self._aggregating, self.engine.open if self.engine else None
        if started is None:
            return
        if state is None or not state.aggregating or state.round != started[0]:
            self._aggregating = None  # committed, or failed and retried
        elif now - started[1] > self.aggregate_timeout_s:
            self._aggregating = None
            self._pause(
                StorageError(
                    f"the aggregation of round {started[0]} did not finish within "
                    f"{self.aggregate_timeout_s:g} s; the disk or the machine may be stuck",
                    code="storage.timeout",
                )
            )

    def _close_overdue(self, now: float) -> None:
        """Close the connections that did not identify in time (slow or idle peers holding
        sockets). They leave the budget at once, so the supervisor does not wake for them
        again while their closing handshake runs."""
        for ws in self.pending.overdue(now):
            self.pending.closed(ws)
            conn = self._conns.get(ws)  # type: ignore[call-overload]
            if conn is None:
                continue
            log.info("closing a connection from %s that did not identify in time", conn.peer)
            conn.session.close(
                "net.identify_timeout",
                f"no enrolment or sign-in within {self.pending.identify_within_s:g} s",
            )
            self._spawn(self._flush_and_close(conn))

    def _pause(self, exc: BaseException) -> None:
        """Stop the run after a failed disk write (``coordinator.pause``): say why in the log,
        in ``paused.json`` for ``status`` and to the connected sites, then act on no more
        round decisions. What was acknowledged is on disk; a restart resumes from it."""
        if self.paused is not None:
            return
        run = self.run
        self.paused = pause = Pause(
            run_id=run.run_id if run is not None else "-",
            round=run.current_round if run is not None else 0,
            code=exc.code if isinstance(exc, TesseraError) else "storage.write",
            reason=str(exc),
            at=self.clock(),
        )
        log.error(
            "run %s paused at round %d: a disk write failed: %s (%s). %s",
            pause.run_id,
            pause.round,
            pause.reason,
            pause.code,
            pause.advice,
        )
        try:
            write_pause(self.fed.paths.root, pause)
        except OSError as err:
            log.error("cannot record the pause for `status` either: %s", err)
        for conn in list(self.connections.values()):
            conn.session.send(ErrorMessage(code="coordinator.paused", message=PAUSED_MESSAGE))
            self._spawn(self._flush(conn))

    def _load_run(self) -> None:
        run = self.fed.store.active_run()
        if run is None or (self.run is not None and run.run_id == self.run.run_id):
            return
        plan = self.fed.plan(run.plan_hash)
        row = self.fed.store.plan(run.plan_hash)
        self.run, self.plan = run, plan
        self.plan_signature = row["signature"] if row else ""
        stored = {u.site_id for u in self.fed.store.updates(run.run_id, run.current_round)}
        self.engine = RoundEngine(
            rounds=plan.rounds,
            quorum=plan.quorum,
            min_sites=plan.min_sites,
            deadline_s=plan.round_deadline_s,
            current_round=run.current_round,
            reported=stored,
            carry_updates=not plan.secure_aggregation,  # each attempt masks afresh
        )
        self.model = None
        self._timer = None
        log.info(
            "run %s at round %d (%d updates on disk)", run.run_id, run.current_round, len(stored)
        )
        now = self.clock()
        for site_id in sorted(self.connections):
            self._site_ready(site_id, now)

    # -- engine actions ------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        if self.paused is not None:
            return  # a failed disk write stopped the run: a restart picks it up from disk
        for action in actions:
            try:
                self._do(action)
            except TesseraError as exc:
                log.error("cannot carry out %s: %s (%s)", action, exc, exc.code)
                if isinstance(exc, StorageError):  # a failed disk write: pause, say why
                    self._pause(exc)
                    return
                if isinstance(action, Aggregate) and self.engine is not None:
                    self._apply(self.engine.aggregate_failed(action.round, str(exc), self.clock()))

    def _do(self, action: Action) -> None:
        assert self.run is not None and self.plan is not None and self.engine is not None
        now = self.clock()
        if isinstance(action, OpenRound):
            timer = self._round_timer(action.round)
            started = self.monotonic()
            self.fed.store.open_round(
                self.run.run_id,
                action.round,
                list(action.selected),
                self.run.model_digest,
                now,
                action.deadline,
            )
            opened = self.monotonic()
            timer.add("commit", opened - started)
            self._prepare_model(action.round)
            timer.add("model_encode", self.monotonic() - opened)
            if self.secagg.on:
                self._spawn(self.secagg.open(action))
            if self.he.on:
                self.he.open(action)
            self._assess_scanner_shift(now)
        elif isinstance(action, InviteSite):
            conn = self.connections.get(action.site_id)
            if self.he.on and self.he.without_key(action.site_id):
                # It could neither read the model nor encrypt its own: not invited.
                self._apply(self.engine.site_declined(action.site_id, action.round, now))
            elif conn is not None:
                self._invite(conn, action.round)
        elif isinstance(action, Aggregate):
            self._aggregating = (action.round, now)  # watched by _check_aggregation
            if self.secagg.on:
                self.secagg.close(action)
            else:
                self._spawn(self._aggregate(action))
        elif isinstance(action, RetryRound):
            self.intake.fold = None  # the next attempt's sites may differ
            self.secagg.retried()
            self.he.retried()
            log.warning("round %d retried: %s", action.round, action.reason)
            self.fed.store.fail_round_attempt(self.run.run_id, action.round, action.reason, now)
        elif isinstance(action, FinishRun):
            self._fresh = self._decoded = None  # no next round to send them to
            self.run = self.fed.store.run(self.run.run_id)
            log.info("run finished after %d rounds", action.rounds)
            for conn in list(self.connections.values()):
                self._send_finished(conn)

    def _assess_scanner_shift(self, now: float) -> None:
        """Compare the sites' scanner fingerprints (their shared counts) for the active run;
        log each new assessment in the provenance log, for the run's report, and warn the
        operator when they differ strongly and the plan is not FedBN."""
        run, plan = self.run, self.plan
        if run is None or plan is None or run.status != "running":
            return
        entry = shift_entry(self.fed.store.site_summaries(), plan.aggregation)
        if entry is None or self._shift_seen == (run.run_id, entry):
            return
        self._shift_seen = (run.run_id, entry)
        self.fed.store.log("scanner_shift_assessed", now, run_id=run.run_id, **entry)
        if entry["warning"]:
            log.warning("scanner shift: %s", entry["warning"])

    def _round_timer(self, rnd: int) -> PhaseClock:
        """The phase clock of round ``rnd``, started when it first opens (a retried round
        keeps its clock: the retry is part of its time)."""
        assert self.run is not None
        timer = self._timer
        if timer is None or (timer.run_id, timer.round) != (self.run.run_id, rnd):
            timer = self._timer = PhaseClock("coordinator", self.run.run_id, rnd, self.monotonic())
            timer.cpu -= time.process_time()  # the round's share is added when it is recorded
        return timer

    def _prepare_model(self, rnd: int) -> None:
        """Offer and signature of the round's global model, made once for every site. The
        bytes come from the aggregation that made them (already hashed as they were stored)
        or, after a start, from the blob store, which checks them against their digest."""
        assert self.run is not None and self.plan is not None
        if self.model is not None and self.model.round == rnd:
            return
        digest = self.run.model_digest
        fresh, self._fresh = self._fresh, None
        data = fresh[1] if fresh is not None and fresh[0] == digest else self.fed.blobs.get(digest)
        offer = make_offer("m-" + digest, data, self.limits.chunk_size, sha256=digest)
        signature = sign(
            self.key,
            signed.MODEL,
            signed.model_fields(
                run_id=self.run.run_id, round=rnd, plan_hash=self.plan.plan_hash, sha256=digest
            ),
        )
        self.model = RoundModel(rnd, data, offer, signature)
        if self.he.on and is_encrypted(data):
            return  # an encrypted global model: nothing here can decode it
        if self._decoded is None or self._decoded[0] != digest:
            task = asyncio.ensure_future(asyncio.to_thread(_decode_frozen, data))
            self._decoded = (digest, task)

    async def _model_arrays(self, model_digest: str) -> dict[str, np.ndarray]:
        """The decoded weights of ``model_digest``: those decoded when the round opened, or
        read from the blob store (which checks them) for a model no round has sent."""
        if self._decoded is not None and self._decoded[0] == model_digest:
            return await asyncio.shield(self._decoded[1])
        data = await asyncio.to_thread(self.fed.blobs.get, model_digest)
        return await asyncio.to_thread(_decode_frozen, data)

    def _invite(self, conn: Connection, rnd: int) -> None:
        assert self.run is not None and self.plan is not None
        self._prepare_model(rnd)
        assert self.model is not None
        conn.session.send(
            RoundInvite(
                run_id=self.run.run_id,
                round=rnd,
                plan=self.plan.to_dict(),
                plan_hash=self.plan.plan_hash,
                plan_signature=self.plan_signature,
                model=self.model.offer.body(),
                model_signature=self.model.signature,
                deadline_s=self.plan.round_deadline_s,
            )
        )
        if self.secagg.on and conn.site_id is not None:
            self.secagg.invited(conn.site_id)
        self._spawn(self._flush(conn))

    def _send_finished(self, conn: Connection) -> None:
        """Say the run is over and offer its final model, signed once, for the sites'
        validation on their own held-out data. After a restart with no run active, the
        latest finished run: a site that was told nothing before the restart learns it now."""
        run, plan = self.run, self.plan
        if run is None:
            finished = [r for r in self.fed.store.runs() if r.status == "finished"]
            if finished:
                run, plan = finished[-1], self.fed.plan(finished[-1].plan_hash)
        if run is None or plan is None or run.status != "finished":
            return
        final = self._final
        if final is None or final.offer.sha256 != run.model_digest:
            try:
                data = self.fed.blobs.get(run.model_digest)
            except TesseraError as exc:
                log.error("cannot offer the final model: %s", exc)
                data = None
            if data is not None:
                offer = make_offer(
                    "f-" + run.model_digest, data, self.limits.chunk_size, sha256=run.model_digest
                )
                signature = sign(
                    self.key,
                    signed.FINAL_MODEL,
                    signed.final_model_fields(
                        run_id=run.run_id,
                        rounds=run.current_round,
                        plan_hash=plan.plan_hash,
                        sha256=run.model_digest,
                    ),
                )
                final = self._final = RoundModel(run.current_round, data, offer, signature)
        conn.session.send(
            RunFinished(
                run_id=run.run_id,
                rounds=run.current_round,
                final_model=run.model_digest,
                plan_hash=plan.plan_hash if final else "",
                model=final.offer.body() if final else {},
                model_signature=final.signature if final else "",
            )
        )
        self._spawn(self._flush(conn))

    async def _aggregate(self, action: Aggregate) -> None:
        assert self.run is not None and self.plan is not None and self.engine is not None
        run, plan = self.run, self.plan
        updates = [
            u for u in self.fed.store.updates(run.run_id, action.round) if u.site_id in action.sites
        ]
        strategy = make_strategy(
            plan.aggregation, plan.aggregation_params, weighting=plan.weighting
        )
        timer = self._round_timer(action.round)
        fold, self.intake.fold = self.intake.fold, None
        if fold is not None and fold.key != (run.run_id, action.round, run.model_digest):
            fold = None
        catchup, self.intake.fold_catchup = self.intake.fold_catchup, None
        if fold is not None and catchup is not None:
            with contextlib.suppress(Exception):  # what it could not fold is read again
                await catchup
        try:
            state_in = self._opt_state_before(run.run_id, action.round, strategy)
            started = self.monotonic()
            if self.he.on:  # the weighted mean of encrypted models, added blind
                result = RoundResult(await self.he.aggregate(run.run_id, updates))
            else:
                base = await self._model_arrays(run.model_digest)
                result = await asyncio.to_thread(
                    functools.partial(
                        aggregate_round,
                        self.fed.blobs,
                        run.model_digest,
                        updates,
                        strategy,
                        state_in,
                        base=base,
                        codec=plan.codec,
                        fold=fold,
                    )
                )
            aggregated = self.monotonic()
            timer.add("aggregate", aggregated - started)
            state_out, digest = await asyncio.to_thread(self._persist, result)
            persisted = self.monotonic()
            timer.add("persist", persisted - aggregated)
            mean_loss = sum(u.train_loss for u in updates) / len(updates)
            final = action.round >= plan.rounds
            self.fed.store.commit_round(
                run.run_id,
                action.round,
                digest,
                len(updates),
                mean_loss,
                final,
                self.clock(),
                opt_state=state_out,
            )
            timer.add("commit", self.monotonic() - persisted)
        except TesseraError as exc:
            log.error("aggregation of round %d failed: %s", action.round, exc)
            if isinstance(exc, StorageError):  # a failed disk write: pause, do not retry blind
                self._pause(exc)
            self._apply(self.engine.aggregate_failed(action.round, str(exc), self.clock()))
            return
        self.run = self.fed.store.run(run.run_id)
        self._fresh = (digest, result.model)  # the next round's model, already hashed
        self._record(timer)
        log.info("round %d aggregated from %d updates", action.round, len(updates))
        self._apply(self.engine.aggregate_committed(action.round, self.clock()))
        self._wake.set()

    def _persist(self, result: Any) -> tuple[str | None, str]:
        """Write the new model (and optimiser state) durably; in a worker thread."""
        state = None if result.opt_state is None else self.fed.blobs.put(result.opt_state)
        return state, self.fed.blobs.put(result.model)

    def _record(self, timer: PhaseClock) -> None:
        timer.cpu += time.process_time()
        record = timer.record(self.monotonic())
        self.timings.append(record)
        self._timer = None
        try:
            append_timings(self.fed.paths.root / TIMINGS_FILE, record)
        except OSError as exc:  # a measurement: never worth failing a round for
            log.warning("cannot write the round's timings: %s", exc)

    def _opt_state_before(self, run_id: str, rnd: int, strategy: StrategyConfig) -> str | None:
        """Digest of the server optimiser's state after round ``rnd - 1`` (``None``: round 1,
        or a strategy without server state)."""
        if server_optimiser(strategy) is None or rnd == 1:
            return None
        prev = self.fed.store.round_row(run_id, rnd - 1)
        digest = prev.get("opt_state") if prev else None
        if not digest:
            raise StorageError(
                f"the server optimiser's state after round {rnd - 1} is not in the store; "
                "the run cannot continue with this strategy",
                code="storage.blob",
            )
        return str(digest)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connections ---------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        peer = str(ws.remote_address[0]) if ws.remote_address else "?"
        now = self.clock()
        admitted = self.pending.admit(ws, peer, now)
        if not admitted.allowed:
            log.warning("connection from %s refused: %s", peer, admitted.code)
            ws.close_timeout = 1
            with contextlib.suppress(ConnectionClosed):
                await ws.send(
                    encode(ErrorMessage(code=admitted.code, message=admitted.reason, fatal=True))
                )
            await ws.close()
            return
        # Until it identifies, a peer may send only small messages (Enrol, Authenticate).
        ws.protocol.max_message_size = self.peer_limits.max_frame_before_identity
        nonce = base64.urlsafe_b64encode(os.urandom(32)).decode("ascii").rstrip("=")
        session = CoordinatorSession(
            nonce=nonce, federation=self.fed.config.federation, limits=self.limits
        )
        conn = Connection(ws, session, peer=peer, meter=self.peer_limits.message_meter(now))
        self._conns[ws] = conn
        self._wake.set()  # the supervisor takes this connection's deadline into account
        meter = conn.meter
        assert meter is not None
        try:
            await self._flush(conn)
            async for frame in ws:
                # Decoded before it is metered: what a frame costs depends on what it is.
                session.receive_frame(frame)
                events = session.events_received()
                verdict = meter.admit(self.clock(), self._frame_cost(conn, events))
                if not verdict.allowed:
                    await self._disconnect_flooder(conn, verdict.code, verdict.reason)
                    break
                if verdict.wait_s > 0:  # back-pressure: TCP slows the sender meanwhile
                    await asyncio.sleep(verdict.wait_s)
                try:
                    for event in events:
                        await self._on_event(conn, event)
                except (OSError, StorageError) as exc:  # a disk write failed: pause the run
                    self._pause(exc)
                    session.close("coordinator.paused", PAUSED_MESSAGE)
                await self._flush(conn)
                if session.closed:
                    break
        except ConnectionClosed:
            pass
        finally:
            self.pending.closed(ws)
            self._conns.pop(ws, None)
            for upload in conn.uploads.values():
                # Closing flushes: after a failed write the flush fails too (the run is
                # paused by then); the file is closed either way.
                with contextlib.suppress(OSError):
                    upload.fh.close()
            site_id = conn.site_id
            if site_id is not None and self.connections.get(site_id) in (None, conn):
                # This site's uploads and queued offers end with it (unless a newer
                # connection of the site has taken them over).
                for transfer_id in [*conn.uploads, *conn.queued]:
                    self.intake.release(site_id, transfer_id)
            if site_id is not None and self.connections.get(site_id) is conn:
                del self.connections[site_id]
                if self.engine is not None:
                    self._apply(self.engine.site_offline(site_id, self.clock()))
                    self.secagg.site_gone(site_id)
            await ws.close()

    def _frame_cost(self, conn: Connection, events: list[Event]) -> float:
        """What one frame costs against its connection's message rate. A chunk of an accepted
        upload is bounded by bytes instead (``PeerLimits.free_chunk_bytes``): a big update in
        many chunks is not a flood. A chunk acknowledgement is free while it answers a chunk
        sent to this peer (``TransferAccept`` of a download grants one per chunk to come).
        Anything else is one message."""
        for event in events:
            if isinstance(event, ChunkReceived):
                free = event.complete or len(event.data) >= self.peer_limits.free_chunk_bytes
                return 0.0 if free else 1.0
            if not isinstance(event, MessageReceived):
                continue
            msg = event.message
            if isinstance(msg, ChunkAck) and conn.ack_credit > 0:
                conn.ack_credit -= 1
                return 0.0
            if isinstance(msg, TransferAccept):
                offer = self._download_offer(msg.transfer_id)
                if offer is not None:
                    conn.ack_credit += max(0, offer.total_chunks - msg.next_index)
        return 1.0

    def _download_offer(self, transfer_id: str) -> TransferOffer | None:
        """The offer of a payload this coordinator serves (round model, final model,
        release) with id ``transfer_id``."""
        for model in (self.model, self._final):
            if model is not None and model.offer.transfer_id == transfer_id:
                return model.offer
        pack = self._release_packs.get(transfer_id)
        return pack[2].offer if pack is not None else None

    async def _disconnect_flooder(self, conn: Connection, code: str, reason: str) -> None:
        """Close a connection that kept sending above its message rate: a fatal error with
        ``code``, then the websocket with 1008 (policy violation) and the code as its
        reason. The site reconnects with backoff; the flood's frames are dropped unread."""
        who = conn.site_id or "an unidentified peer"
        log.warning("disconnecting %s (%s): %s (%s)", who, conn.peer, reason, code)
        conn.session.close(code, reason)
        conn.ws.close_timeout = 1  # a flooder need not answer our close
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_TIMEOUT_S):
                await self._flush(conn)
        await conn.ws.close(CloseCode.POLICY_VIOLATION, f"{code}: too many messages")

    def send_to(self, site: str, message: Message) -> None:
        """Send ``message`` to ``site`` if it is connected (the privacy links' relays)."""
        conn = self.connections.get(site)
        if conn is not None:
            conn.session.send(message)
            self._spawn(self._flush(conn))

    async def _flush(self, conn: Connection) -> None:
        for frame in conn.session.data_to_send():
            try:
                await conn.ws.send(frame)
            except ConnectionClosed:
                return

    async def _on_event(self, conn: Connection, event: Event) -> None:
        if isinstance(event, MessageReceived):
            await self._on_message(conn, event.message)
        elif isinstance(event, ChunkReceived):
            upload = conn.uploads.get(event.transfer_id)
            if upload is not None:
                # Hashed and written in a thread: the loop serves the other sites meanwhile.
                # Acknowledged after; the digest of the last chunk's ack completes the upload.
                await asyncio.to_thread(store_chunk, upload, event.data)
                digest = upload.sha256.hexdigest() if event.complete else None
                conn.session.ack(event.transfer_id, sha256=digest)
                if event.complete:  # TransferComplete, or TransferFailed on a bad digest
                    for after in conn.session.events_received():
                        await self._on_event(conn, after)
            else:
                self.secagg.on_chunk(conn, event)  # a masked update, summed when complete
        elif isinstance(event, TransferComplete):
            upload = conn.uploads.pop(event.offer.transfer_id, None)
            if upload is None:
                self.secagg.on_complete(conn, event)
            else:
                try:
                    await self.intake.finish(conn, upload)
                finally:
                    self.intake.release(conn.site_id or "", event.offer.transfer_id)
        elif isinstance(event, TransferFailed):
            upload = conn.uploads.pop(event.transfer_id, None)
            if upload is not None:
                upload.fh.close()
                upload.path.unlink(missing_ok=True)
                self.intake.release(conn.site_id or "", event.transfer_id)
                self.intake.reject(conn, upload.offer, event.code, event.reason)
        elif isinstance(event, PeerViolation):
            log.warning(
                "site %s broke the protocol: %s (%s)", conn.site_id, event.reason, event.code
            )
        elif isinstance(event, Closed):
            log.info("connection of %s closed: %s", conn.site_id, event.reason)

    async def _on_message(self, conn: Connection, msg: Any) -> None:
        now = self.clock()
        if isinstance(msg, Enrol | Authenticate):
            # An enrolled site's sign-in is never throttled by address (limits.IdentityGuard).
            enrolled = isinstance(msg, Authenticate) and self.fed.store.site(msg.site_id)
            verdict = ALLOWED if enrolled else self.identity_guard.check(conn.peer, now)
            if not verdict.allowed:
                log.warning("identity attempt from %s throttled", conn.peer)
                conn.session.reject(verdict.code, verdict.reason)
            elif isinstance(msg, Enrol):
                self._enrol(conn, msg, now)
            else:
                self._authenticate(conn, msg, now)
        elif isinstance(msg, TransferAccept) and msg.transfer_id in self._release_packs:
            await self._serve_release(conn, msg)
        elif isinstance(msg, TransferAccept):
            model = next(
                (
                    m
                    for m in (self.model, self._final)
                    if m is not None and m.offer.transfer_id == msg.transfer_id
                ),
                None,
            )
            if model is not None:
                await self._send_model(conn, model, msg)
            else:
                conn.session.send(
                    ErrorMessage(
                        code="protocol.transfer_index", message="no such transfer", ref=msg.TYPE
                    )
                )
        elif isinstance(msg, ChunkAck):
            pass  # download progress; resume uses the site's own TransferAccept
        elif isinstance(msg, UpdateOffer):
            self.intake.offer(conn, msg, now)
        elif isinstance(msg, SECAGG_MESSAGES) and conn.site_id is not None:
            self.secagg.on_message(conn, msg, now)
        elif isinstance(msg, HE_MESSAGES) and conn.site_id is not None:
            self.he.on_message(conn, msg, now)
        elif isinstance(msg, RoundDecline):
            log.info("site %s declined round %d: %s", conn.site_id, msg.round, msg.reason)
            if self.engine is not None and self.run is not None and msg.run_id == self.run.run_id:
                self._apply(self.engine.site_declined(conn.site_id or "", msg.round, now))
        elif isinstance(msg, DataSummaryReport) and conn.site_id is not None:
            self.fed.store.save_site_summary(conn.site_id, msg.summary, now)
            log.info(
                "site %s shared its data summary (%d images)", conn.site_id, msg.summary["images"]
            )
            self._assess_scanner_shift(now)
        elif (
            isinstance(
                msg, CharterSignature | PlanDecision | ValidationReport | HeadRequest | Dispute
            )
            and conn.site_id is not None
        ):
            self._on_governance(conn, conn.site_id, msg, now)
        elif isinstance(msg, ReleaseAcceptance) and conn.site_id is not None:
            try:
                if release.record_acceptance(self.fed, conn.site_id, msg, now):
                    log.info(
                        "site %s %s release %s",
                        conn.site_id,
                        "accepted" if msg.accepted else "refused",
                        msg.version,
                    )
            except TesseraError as exc:
                log.warning("release acceptance from %s refused: %s", conn.site_id, exc)
                conn.session.send(ErrorMessage(code=exc.code, message=exc.message, ref=msg.TYPE))
        elif isinstance(msg, ErrorMessage):
            log.warning("site %s reports %s: %s", conn.site_id, msg.code, msg.message)

    def _on_governance(self, conn: Connection, site_id: str, msg: Any, now: float) -> None:
        """What a site signed or asks of the log; each checked against its key first."""
        try:
            if isinstance(msg, CharterSignature):
                governance.record_charter_signature(self.fed, site_id, msg, now)
                log.info("site %s signed charter version %d", site_id, msg.version)
                self._site_ready(site_id, now)
            elif isinstance(msg, PlanDecision):
                governance.record_plan_decision(self.fed, site_id, msg, now)
                log.info("site %s: %s plan %s", site_id, msg.decision, msg.plan_hash[:12])
            elif isinstance(msg, ValidationReport):
                governance.record_validation(self.fed, site_id, msg, now)
                log.info("site %s validated round %d: %s", site_id, msg.round, msg.metrics)
            elif isinstance(msg, Dispute):
                if governance.record_dispute(self.fed, site_id, msg, now):
                    log.warning(
                        "site %s raised dispute %s: %s", site_id, msg.dispute_id, msg.reason
                    )
            else:
                update = governance.head_update(self.fed, site_id, msg)
                if update is not None:
                    conn.session.send(update)
        except TesseraError as exc:
            log.warning("%s from %s refused: %s (%s)", msg.TYPE, site_id, exc, exc.code)
            conn.session.send(ErrorMessage(code=exc.code, message=exc.message, ref=msg.TYPE))

    def _enrol(self, conn: Connection, msg: Enrol, now: float) -> None:
        try:
            verify(
                msg.public_key,
                signed.ENROL,
                signed.enrol_fields(
                    nonce=conn.session.nonce,
                    token=msg.token,
                    public_key=msg.public_key,
                    site_name=msg.site_name,
                    fingerprint=self.fingerprint,
                ),
                msg.signature,
            )
            site = self.fed.store.redeem_invitation(token_digest(msg.token), msg.public_key, now)
        except TesseraError as exc:
            log.warning("enrolment refused: %s (%s)", exc, exc.code)
            self.identity_guard.failed(conn.peer, now)
            conn.session.reject(exc.code, exc.message)
            return
        self._welcome(conn, site.site_id, site.name, now)

    def _authenticate(self, conn: Connection, msg: Authenticate, now: float) -> None:
        site = self.fed.store.site(msg.site_id)
        if site is None:
            self.identity_guard.failed(conn.peer, now)
            conn.session.reject(
                "identity.unknown_site",
                "This site is not enrolled in the federation. Enrol again with a new "
                "invitation code.",
            )
            return
        try:
            verify(
                site.public_key,
                signed.AUTH,
                signed.auth_fields(
                    nonce=conn.session.nonce, site_id=msg.site_id, fingerprint=self.fingerprint
                ),
                msg.signature,
            )
        except TesseraError as exc:
            log.warning("authentication of %s failed: %s", msg.site_id, exc)
            conn.session.reject(exc.code, "authentication failed: the signature does not verify")
            return
        self._welcome(conn, site.site_id, site.name, now)

    def _welcome(self, conn: Connection, site_id: str, name: str, now: float) -> None:
        old = self.connections.get(site_id)
        if old is not None:
            old.session.close("net.replaced", "a newer connection of this site took over")
            self._spawn(self._flush_and_close(old))
        conn.site_id = site_id
        self.connections[site_id] = conn
        self.pending.identified(conn.ws)
        conn.ws.protocol.max_message_size = self.limits.max_frame_bytes
        conn.session.accept_identity(
            site_id=site_id,
            site_name=name,
            coordinator_key=self.public_key,
            federation=self.fed.config.federation,
        )
        log.info("site %s (%s) connected", site_id, name)
        conn.session.send(governance.notice(self.fed, site_id))
        notice = self._release_notice(site_id)
        if notice is not None:
            conn.session.send(notice)
        if self.engine is not None and not self.engine.finished:
            self._site_ready(site_id, now, connected=True)
        else:
            self._send_finished(conn)

    def _site_ready(self, site_id: str, now: float, *, connected: bool = False) -> None:
        """Bring a connected site into the engine if it may take part (it signed the current
        charter), or keep it out, saying why in the log. ``connected``: the site has just
        (re)connected, so an open round invites it again (it resumes where it was)."""
        if self.engine is None or self.engine.finished:
            return
        reason = governance.ineligibility(self.fed, site_id)
        online = site_id in self.engine.online
        if reason is None and (connected or not online):
            self._apply(self.engine.site_online(site_id, now))
        elif reason is not None:
            log.info("site %s is left out of rounds: it %s", site_id, reason)
            if online:
                self._apply(self.engine.site_offline(site_id, now))

    def _governance_changed(self) -> None:
        """A charter was published or a run started from the admin CLI: tell every connected
        site and re-check who may take part."""
        charter = self.fed.store.charter()
        state = (charter.version if charter else 0, self.run.run_id if self.run else None)
        if state == self._governance_seen:
            return
        self._governance_seen = state
        now = self.clock()
        for site_id, conn in list(self.connections.items()):
            conn.session.send(governance.notice(self.fed, site_id))
            self._spawn(self._flush(conn))
            self._site_ready(site_id, now)

    # -- releases ------------------------------------------------------------------------

    def _release_pack(self, version: str, run_id: str) -> RoundModel | None:
        """The packed release ``version``, built on first use and kept (its bytes never
        change); ``None`` if it cannot be rebuilt (logged)."""
        for v, _, pack in self._release_packs.values():
            if v == version:
                return pack
        try:
            data = release.release_pack(self.fed, version)
        except TesseraError as exc:
            log.error("cannot offer release %s: %s", version, exc)
            return None
        sha = hashlib.sha256(data).hexdigest()
        offer = make_offer(f"rel-{version}-{sha[:16]}", data, self.limits.chunk_size, sha256=sha)
        pack = RoundModel(0, data, offer, "")
        self._release_packs[offer.transfer_id] = (version, run_id, pack)
        return pack

    def _release_notice(self, site_id: str) -> ReleaseNotice | None:
        """The releases ``site_id`` may receive (``None`` when none was ever published)."""
        published = release.releases(self.fed.store)
        if not published:
            return None
        items = []
        for r in published[-64:]:
            if not release.may_receive(self.fed.store, r.run_id, site_id):
                continue
            pack = self._release_pack(r.version, r.run_id)
            if pack is not None:
                items.append({"version": r.version, "run_id": r.run_id, "offer": pack.offer.body()})
        return ReleaseNotice(releases=items)

    def _releases_changed(self) -> None:
        """A release was published from the admin CLI: offer it to the connected sites."""
        versions = tuple(r.version for r in release.releases(self.fed.store))
        if versions == self._releases_seen:
            return
        self._releases_seen = versions
        for site_id, conn in list(self.connections.items()):
            notice = self._release_notice(site_id)
            if notice is not None:
                conn.session.send(notice)
                self._spawn(self._flush(conn))

    async def _serve_release(self, conn: Connection, msg: TransferAccept) -> None:
        """Send a packed release, from ``next_index`` on, to a site that took part in its run;
        any other site is refused (it never got the offer, but may have guessed it)."""
        version, run_id, pack = self._release_packs[msg.transfer_id]
        if conn.site_id is None or not release.may_receive(self.fed.store, run_id, conn.site_id):
            log.warning("site %s asked for release %s, which is not for it", conn.site_id, version)
            conn.session.send(
                ErrorMessage(
                    code="release.not_participant",
                    message=f"release {version} goes only to the sites that took part in run "
                    f"{run_id}",
                    ref=msg.TYPE,
                )
            )
            return
        try:
            for frame in pack.frames.from_index(msg.next_index):
                await conn.ws.send(frame)
        except TransferError as exc:
            conn.session.send(ErrorMessage(code=exc.code, message=exc.message, ref=msg.TYPE))

    async def _send_model(self, conn: Connection, model: RoundModel, msg: TransferAccept) -> None:
        """Send ``model`` from ``msg.next_index`` on, in its turn: model transfers go one at a
        time, in the order the sites asked (``MODEL_TURN_WAIT_S``)."""
        try:
            await asyncio.wait_for(self._model_turn.acquire(), MODEL_TURN_WAIT_S)
            held = True
        except TimeoutError:
            held = False  # the transfer ahead is stalled: go alongside it
        try:
            for frame in model.frames.from_index(msg.next_index):
                await conn.ws.send(frame)
        except TransferError as exc:  # a resume index beyond the model's chunks
            conn.session.send(ErrorMessage(code=exc.code, message=exc.message, ref=msg.TYPE))
        finally:
            if held:
                self._model_turn.release()

    async def _flush_and_close(self, conn: Connection) -> None:
        conn.ws.close_timeout = 1  # a peer that stopped reading must not hold the socket
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_TIMEOUT_S):
                await self._flush(conn)
        await conn.ws.close()


def _decode_frozen(data: bytes | memoryview) -> dict[str, np.ndarray]:
    """Decoded weights, read-only: one decode serves several steps of the round (update
    checks, the aggregate, a retried aggregate), so none of them may change it. Views of
    ``data`` (immutable ``bytes``, or a read-only view of a buffer nothing else writes: the
    aggregation's), kept alive by them, not a copy."""
    arrays = decode_tensors(data, copy=False)
    for array in arrays.values():
        array.setflags(write=False)
    return arrays
