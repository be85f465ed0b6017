"""The site's participation loop: one outbound connection, rounds pushed by the coordinator.

Theory of operation: ``Participant.run`` keeps one pinned wss connection open, reconnecting
with jittered exponential backoff when it drops. A ``SiteSession`` turns frames into events;
this adapter verifies what the coordinator signed (plan and model), stores the model as it
arrives (resumable), trains in a warm child process (``Trainer``, started when the first
invitation arrives so that its start overlaps the download, and kept across rounds) while the
connection stays responsive, and offers the signed update. A computed update waits in the
outbox until the coordinator acknowledges it, so a reconnect re-offers it instead of training
again. Only model weights' differences leave the site: no pixel data and no patient
identifiers.

Nothing here polls: every step is triggered by a frame from the coordinator or by the end of
the step before. Each round's phases (download, verify, train, encode update, upload) are
timed with a monotonic clock and appended to ``timings.jsonl`` in the site's data directory
when the update is accepted (``shared.phases``).

A view follows along through ``on_phase``: one :class:`PhaseEvent` per step (connecting,
connected, disconnected, downloading, training, uploading, accepted, validating, validated,
declined, finished, release_received, release_rejected), called on the participant's event
loop; ``on_status`` strings are for people and logs, not to be parsed.

Releases: a ``ReleaseNotice`` lists the releases this site may have; each one not yet kept
(nor refused before) is downloaded like a model, verified, kept and validated on the site's
held-out data, and a signed ``ReleaseAcceptance`` goes back (:mod:`.release_receiver`); verdicts
are sent again on every connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from shared.crypto.keys import load_private_key
from shared.crypto.signing import sign, verify
from shared.crypto.tls import connect_pinned
from shared.errors import ConnectionFailed, TesseraError
from shared.files import map_file
from shared.phases import TIMINGS_FILE, PhaseClock, RoundTimings, append_timings
from shared.plan import TrainingPlan
from shared.protocol import signed
from shared.protocol.codec import DEFAULT_LIMITS, Limits
from shared.protocol.messages import (
    Challenge,
    DataSummaryReport,
    ErrorMessage,
    GovernanceNotice,
    HeadUpdate,
    HEKeyDirectory,
    HEKeyRequest,
    HESealedKey,
    ReleaseNotice,
    RoundDecline,
    RoundInvite,
    RunFinished,
    SecAggKeys,
    SecAggSetup,
    SecAggShares,
    SecAggUnmask,
    TransferAccept,
    UpdateAccepted,
    UpdateOffer,
    Welcome,
)
from shared.protocol.session import (
    ChunkReceived,
    Closed,
    MessageReceived,
    PeerViolation,
    SiteSession,
    TransferComplete,
    TransferFailed,
)
from shared.protocol.transfer import chunk_frames, make_offer
from shared.provenance.errors import ProvenanceError
from site_client.core import local_state
from site_client.core import releases as site_releases
from site_client.core.config import SiteDir
from site_client.core.downloads import Download, open_download
from site_client.core.governance import SiteGovernance
from site_client.core.governance_link import (
    GovernanceLink,
    StandingApprovals,
    pending_disputes,
)
from site_client.core.he_participant import HEKeys
from site_client.core.release_receiver import ReleaseReceiver
from site_client.core.secagg_participant import SecAggRounds
from site_client.core.trainer import Trainer

log = logging.getLogger("tessera.site")

WELCOME_TIMEOUT_S = 60.0  # from the connection opening to the coordinator's welcome

FATAL_CODES = {
    "identity.unknown_site",
    "crypto.bad_signature",
    "net.pin_mismatch",
    # the coordinator's log is not what this site saw: stop taking part (provenance.*)
    "provenance.rewritten",
    "provenance.shrunk",
    "provenance.bad_signature",
    "provenance.bad_head",
    "provenance.missing_entry",
    "provenance.misrecorded",
}


@dataclass(frozen=True, slots=True)
class LocalData:
    """Where the site's training images come from: a DICOM folder and a labels CSV, or, with
    neither (``LocalData.site_index()``), the images imported into the site's study index
    and their attached labels (``tessera-site import DIR --labels CSV``)."""

    dicom_dir: Path | None = None
    labels_csv: Path | None = None

    @classmethod
    def site_index(cls) -> LocalData:
        return cls()

    @property
    def from_index(self) -> bool:
        return self.dicom_dir is None or self.labels_csv is None


@dataclass(frozen=True, slots=True)
class PhaseEvent:
    """One step of taking part, for a view: ``phase`` names it; ``detail`` holds its figures
    (``rounds`` when downloading, ``train_loss`` and ``num_samples`` when uploading,
    ``metrics`` when validated, ``reason`` when disconnected or declined)."""

    phase: str
    run_id: str = ""
    round: int = 0
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Jittered exponential backoff ("full jitter"): spreads reconnects of many sites."""

    base_s: float = 0.5
    cap_s: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.cap_s, self.base_s * 2**attempt))


@dataclass
class Pending:
    """An update computed for (run, round), waiting for the coordinator's acknowledgement."""

    offer_msg: UpdateOffer
    path: Path


class RunOver(Exception):
    """Raised inside the loop when the coordinator says the run is finished."""


class Participant:
    def __init__(
        self,
        site_dir: SiteDir,
        data: LocalData,
        *,
        exit_when_done: bool = False,
        share_summary: bool = False,
        limits: Limits = DEFAULT_LIMITS,
        backoff: Backoff | None = None,
        threads: int = 1,
        on_status: Callable[[str], None] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        standing: StandingApprovals | None = None,
        on_phase: Callable[[PhaseEvent], None] | None = None,
        proxy: str | None = None,
        on_frame_out: Callable[[bytes | str], None] | None = None,
    ) -> None:
        self.dir = site_dir
        site_dir.ensure()
        self.config = site_dir.load()
        self.key = load_private_key(site_dir.key_file)
        self.governance = GovernanceLink(
            SiteGovernance(
                site_dir.governance_db,
                federation=self.config.federation,
                site_id=self.config.site_id,
                coordinator_key=self.config.coordinator_key,
            ),
            self.config,
            self.key,
            standing,
        )
        self.data = data
        self.exit_when_done = exit_when_done
        self.share_summary = share_summary  # the site's choice; off unless it opts in
        self.limits = limits
        self.proxy = proxy  # HTTP(S) proxy URL; None: the environment's HTTPS_PROXY, if any
        self.backoff = backoff or Backoff()
        self.trainer = Trainer(site_dir.jobs, threads=threads, on_progress=on_progress)
        self.on_status = on_status or (lambda s: log.info("%s", s))
        self._on_phase = on_phase
        # Every frame this site sends, as sent: for an audit of what leaves the hospital.
        self._on_frame_out = on_frame_out
        self.welcome_timeout_s = WELCOME_TIMEOUT_S
        self._welcomed = False
        self.rng = rng or random.Random()
        self.clock = clock  # monotonic: phase timings only
        self.rounds_done: list[tuple[str, int]] = []
        self.timings: list[RoundTimings] = []  # this process's rounds, also in timings.jsonl
        self._clocks: dict[tuple[str, int], PhaseClock] = {}
        # Models whose bytes this process hashed as they arrived: the worker need not again.
        self._verified: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ws: ClientConnection | None = None
        self._session: SiteSession | None = None
        self._downloads: dict[str, Download] = {}
        self._uploads: dict[str, tuple[Any, bytes | memoryview]] = {}  # UpdateOffer or masked
        self._round_models: list[Path] = []  # downloaded by this session, oldest first
        self._training: asyncio.Task[None] | None = None
        self._validating: asyncio.Future[None] | None = None
        self._to_validate: tuple[str, int, dict[str, Any], Path] | None = None
        self._training_key: tuple[str, int] | None = None
        self._finished: RunFinished | None = None
        self.secagg = SecAggRounds(self)  # securely aggregated rounds (secagg_participant)
        self.he = HEKeys(self)  # the CKKS key of homomorphically encrypted runs
        self.releases = ReleaseReceiver(self)  # releases offered to this site

    def _phase(self, phase: str, run_id: str = "", rnd: int = 0, **detail: Any) -> None:
        if self._on_phase is not None:
            self._on_phase(PhaseEvent(phase, run_id, rnd, detail))

    # -- connection loop -----------------------------------------------------------------

    async def run(self, max_attempts: int | None = None) -> RunFinished | None:
        """Participate until the run finishes (with ``exit_when_done``) or forever."""
        try:
            return await self._run(max_attempts)
        finally:
            if self._training is not None and not self._training.done():
                self.trainer.cancel()
                self._training.cancel()
            if self._validating is not None and not self._validating.done():
                self._validating.cancel()
            for task in list(self._tasks):  # e.g. a release's acceptance validation
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.trainer.close()
            self.governance.record.close()

    async def _run(self, max_attempts: int | None) -> RunFinished | None:
        attempt = 0
        while True:
            self._phase("connecting")
            try:
                await self._connect_once()
                attempt = 0
                self._phase("disconnected", reason="the coordinator closed the connection")
            except RunOver:
                self._phase("disconnected", reason="the run is finished")
                return self._finished
            except ConnectionFailed as exc:
                if exc.code in FATAL_CODES:
                    raise
                self.on_status(f"coordinator unreachable: {exc}")
                self._phase("disconnected", reason=str(exc))
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
                self.on_status(f"connection lost: {exc!r}")
                self._phase("disconnected", reason=f"connection lost: {exc}")
            attempt += 1
            if max_attempts is not None and attempt >= max_attempts:
                raise ConnectionFailed(
                    f"Cannot reach the coordinator at {self.config.coordinator_url} after "
                    f"{attempt} attempts.",
                    code="net.unreachable",
                )
            await asyncio.sleep(self.backoff.delay(attempt, self.rng))

    async def _connect_once(self) -> None:
        async with connect_pinned(
            self.config.coordinator_url,
            self.config.fingerprint,
            proxy=self.proxy,
            open_timeout=15,
            max_size=self.limits.max_frame_bytes,
            ping_interval=20,
            ping_timeout=20,
            # No permessage-deflate: float weights barely compress, and zlib over a 20 MB
            # model costs seconds per round, on both sides (benchmarks/round_overhead.py).
            compression=None,
        ) as ws:
            self._ws = ws
            self._session = SiteSession(limits=self.limits)
            self._downloads.clear()
            self._uploads.clear()
            self._welcomed = False
            # A coordinator that accepts the connection but never signs this site in (stuck,
            # or not a Tessera coordinator) answers pings for ever: give up and reconnect.
            late: list[asyncio.Task[None]] = []
            timer = asyncio.get_running_loop().call_later(
                self.welcome_timeout_s,
                lambda: None if self._welcomed else late.append(asyncio.ensure_future(ws.close())),
            )
            try:
                async for frame in ws:
                    self._session.receive_frame(frame)
                    # Until none is left: handling an event may complete a transfer.
                    while events := self._session.events_received():
                        for event in events:
                            await self._on_event(event)
                    await self._flush()
                    if self._session.closed:
                        break
            finally:
                timer.cancel()
                self._ws = None
                for download in self._downloads.values():
                    download.fh.close()
        if self._finished is not None and self.exit_when_done:
            raise RunOver
        if late:
            raise ConnectionFailed(
                f"The coordinator at {self.config.coordinator_url} accepted the connection but "
                f"did not sign this site in within {self.welcome_timeout_s:g} s.",
                code="net.no_welcome",
            )

    async def _flush(self) -> None:
        if self._ws is None or self._session is None:
            return
        for frame in self._session.data_to_send():
            await self._send(frame)

    async def _send(self, frame: bytes | str) -> None:
        assert self._ws is not None
        if self._on_frame_out is not None:
            self._on_frame_out(frame)
        await self._ws.send(frame)

    # -- events --------------------------------------------------------------------------

    async def _on_event(self, event: Any) -> None:
        session = self._session
        assert session is not None
        if isinstance(event, MessageReceived):
            await self._on_message(event.message)
        elif isinstance(event, ChunkReceived):
            entry = self._downloads.get(event.transfer_id)
            if entry is not None:
                await asyncio.to_thread(entry.store, event.data)
                session.ack(event.transfer_id, sha256=entry.digest_if(event.complete))
        elif isinstance(event, TransferComplete):
            entry = self._downloads.pop(event.offer.transfer_id, None)
            if entry is not None:
                target = entry.target
                entry.fh.close()
                if isinstance(target, site_releases.ReleaseDownload):
                    self.releases.arrived(target)
                    return
                self._verified.add(event.offer.sha256)
                if isinstance(target, RunFinished):
                    self._final_arrived(target)
                else:
                    self._model_arrived(target)
        elif isinstance(event, TransferFailed):
            entry = self._downloads.pop(event.transfer_id, None)
            if entry is not None:
                entry.fh.close()
                target = entry.target
                if isinstance(target, site_releases.ReleaseDownload):
                    target.part.unlink(missing_ok=True)
                else:
                    self._model_part(target).unlink(missing_ok=True)
            self.on_status(f"model download failed: {event.reason}")
        elif isinstance(event, PeerViolation):
            log.warning("coordinator sent something invalid: %s", event.reason)
        elif isinstance(event, Closed):
            if event.code in FATAL_CODES:
                raise ConnectionFailed(event.reason, code=event.code)
            log.info("connection closed: %s", event.reason)

    async def _on_message(self, msg: Any) -> None:
        session = self._session
        assert session is not None
        if isinstance(msg, Challenge):
            session.authenticate(
                site_id=self.config.site_id,
                signature=sign(
                    self.key,
                    signed.AUTH,
                    signed.auth_fields(
                        nonce=msg.nonce,
                        site_id=self.config.site_id,
                        fingerprint=self.config.fingerprint,
                    ),
                ),
            )
        elif isinstance(msg, Welcome):
            self._welcomed = True
            self.on_status(f"connected to {msg.federation} as {msg.site_name}")
            self._phase("connected", federation=msg.federation, site_name=msg.site_name)
            self._ask_head()
            if self.share_summary:
                self._share_summary()
        elif isinstance(msg, GovernanceNotice):
            self._on_notice(msg)
        elif isinstance(msg, HeadUpdate):
            self._on_head(msg)
        elif isinstance(msg, ReleaseNotice):
            self.releases.on_notice(msg)
        elif isinstance(msg, RoundInvite):
            self._on_invite(msg)
        elif isinstance(msg, SecAggSetup | SecAggKeys | SecAggShares | SecAggUnmask):
            await self.secagg.on_message(msg)
        elif isinstance(msg, HEKeyRequest | HEKeyDirectory | HESealedKey):
            await self.he.on_message(msg)
        elif isinstance(msg, TransferAccept):
            entry = self._uploads.get(msg.transfer_id)
            if entry is not None:
                offer_msg, data = entry
                for frame in chunk_frames(offer_msg.update_offer, data, msg.next_index):
                    await self._send(frame)
        elif isinstance(msg, UpdateAccepted):
            self._accepted(msg)
        elif isinstance(msg, RunFinished):
            self._finished = msg
            self.on_status(f"run {msg.run_id} finished after {msg.rounds} rounds")
            self._phase("finished", msg.run_id, msg.rounds)
            self._ask_head()
            if not self._fetch_final(msg) and self.exit_when_done:
                session.close("site.done", "the run is finished")
        elif isinstance(msg, ErrorMessage):
            self._on_error(msg)

    def _share_summary(self) -> None:
        """Send the study index's counts (the scanner fingerprint), nothing else."""
        assert self._session is not None
        from site_client.core.intake.summary import data_summary

        if not self.dir.index_db.is_file():
            return
        index = self.dir.open_index()
        try:
            summary = data_summary(index).to_dict()
        finally:
            index.close()
        try:
            self._session.send(DataSummaryReport(summary=summary))
        except TesseraError as exc:  # a category name too long for the gate: say, send nothing
            self.on_status(f"data summary not shared: {exc}")
            return
        self.on_status(f"shared the data summary ({summary['images']} images, counts only)")

    def _on_error(self, msg: ErrorMessage) -> None:
        self.on_status(f"coordinator says [{msg.code}]: {msg.message}")
        if msg.ref == "update_offer" and not msg.code.startswith("storage."):
            # The update will not be taken (stale, rejected): forget it, train again if asked.
            # One the coordinator could not store (its disk) is kept and offered again.
            for path in self.dir.outbox.glob("*.json"):
                path.unlink(missing_ok=True)
            self._start_validation()
        if msg.fatal and msg.code in FATAL_CODES:
            raise ConnectionFailed(msg.message, code=msg.code)

    # -- rounds --------------------------------------------------------------------------

    def _verify_invite(self, msg: RoundInvite) -> TrainingPlan:
        plan = TrainingPlan.from_dict(msg.plan)
        if plan.plan_hash != msg.plan_hash:
            raise TesseraError("the plan does not match its hash", code="plan.hash_mismatch")
        key = self.config.coordinator_key
        verify(key, signed.PLAN, signed.plan_fields(plan_hash=msg.plan_hash), msg.plan_signature)
        verify(
            key,
            signed.MODEL,
            signed.model_fields(
                run_id=msg.run_id,
                round=msg.round,
                plan_hash=msg.plan_hash,
                sha256=msg.model_offer.sha256,
            ),
            msg.model_signature,
        )
        return plan

    def _decline(self, msg: RoundInvite, code: str, reason: str) -> None:
        assert self._session is not None
        self.on_status(f"declining round {msg.round}: {reason}")
        self._phase("declined", msg.run_id, msg.round, reason=reason)
        self._session.send(
            RoundDecline(run_id=msg.run_id, round=msg.round, code=code, reason=reason)
        )

    def _on_invite(self, msg: RoundInvite) -> None:
        assert self._session is not None
        started = self.clock()
        try:
            self._verify_invite(msg)
        except TesseraError as exc:
            self._decline(msg, exc.code, f"invitation refused: {exc}")
            return
        refusal = self.governance.refusal(
            msg.plan_hash, time.time(), run_id=msg.run_id, rnd=msg.round
        )
        if refusal is not None:  # never trains for a plan this site has not approved
            self._decline(msg, *refusal)
            return
        self._ask_head()  # the last round closed: a new head
        self.secagg.invited(msg)
        timer = self._round_clock(msg, started)
        timer.add("verify", self.clock() - started)
        self.on_status(f"round {msg.round} of {msg.run_id}: receiving the model")
        self._phase("downloading", msg.run_id, msg.round, rounds=msg.plan.get("rounds"))
        pending = self._load_pending(msg)
        if pending is not None:
            self._offer_update(pending)
            return
        if self._training_key == (msg.run_id, msg.round):
            return  # already training for this round; the update follows
        # The worker's start (a torch import, seconds) overlaps the model's download.
        self._spawn(self.trainer.warm_up())
        timer.mark("download", self.clock())
        offer = msg.model_offer
        final = self._model_path(msg)
        if final.is_file():
            self._model_arrived(msg)
            return
        try:
            download = open_download(self._session, msg, offer, self._model_part(msg))
        except TesseraError as exc:
            self._decline(msg, exc.code, str(exc))
            return
        self._downloads[offer.transfer_id] = download

    def _model_path(self, msg: RoundInvite | RunFinished) -> Path:
        offer = msg.model_offer
        assert offer is not None
        return self.dir.models / f"{offer.sha256}.safetensors"

    def _forget_old_models(self, current: Path) -> None:
        """Delete the round models this session downloaded before the last two (the current
        one, and the one before, which a validation may still be reading): a site would
        otherwise keep tens of MB a round on its disk and in its page cache, which makes
        every write slower as it grows."""
        if current in self._round_models:
            return
        self._round_models.append(current)
        while len(self._round_models) > 2:
            # Freeing the file's pages takes milliseconds: not on the event loop.
            self._spawn(asyncio.to_thread(self._round_models.pop(0).unlink, missing_ok=True))

    def _model_part(self, msg: RoundInvite | RunFinished) -> Path:
        offer = msg.model_offer
        assert offer is not None
        return self.dir.models / f"{offer.sha256}.part"

    def _round_clock(self, msg: RoundInvite, now: float) -> PhaseClock:
        """The phase clock of (run, round), started at its first invitation; clocks of other
        rounds are dropped (a round that never finished here records nothing)."""
        key = (msg.run_id, msg.round)
        timer = self._clocks.get(key)
        if timer is None:
            self._clocks = {}
            timer = self._clocks[key] = PhaseClock(
                "site", msg.run_id, msg.round, now, site_id=self.config.site_id
            )
            timer.cpu -= time.process_time()  # the round's share is added when it ends
        return timer

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _model_arrived(self, msg: RoundInvite) -> None:
        part, final = self._model_part(msg), self._model_path(msg)
        if part.exists():
            part.replace(final)
        self._forget_old_models(final)
        timer = self._clocks.get((msg.run_id, msg.round))
        if timer is not None:
            timer.stop("download", self.clock())
        if self._training is not None and not self._training.done():
            self.trainer.cancel()
            self._training.cancel()
        self._training_key = (msg.run_id, msg.round)
        self._training = asyncio.ensure_future(self._train(msg))

    async def _train(self, msg: RoundInvite) -> None:
        started = self.clock()  # a wait for the worker's last validation counts as training
        self._start_validation()  # its upload was never acknowledged: validate before training
        if self._validating is not None and not self._validating.done():
            await asyncio.shield(self._validating)  # the worker does one job at a time
        he_job = await self._he_key_job(msg)
        if he_job is None:  # declined: this site does not hold the run's key
            self._training_key = None
            return
        self.on_status(f"round {msg.round}: training on local data")
        self._phase("training", msg.run_id, msg.round)
        name = f"{msg.run_id}-r{msg.round}"
        seed = int(
            hashlib.sha256(
                f"{msg.plan.get('seed')}:{msg.run_id}:{msg.round}:{self.config.site_id}".encode()
            ).hexdigest()[:8],
            16,
        )
        timer = self._clocks.get((msg.run_id, msg.round))
        base_digest = msg.model_offer.sha256
        try:
            outcome = await self.trainer.train(
                name,
                {
                    "plan": self.secagg.worker_plan(msg.plan),
                    "model_path": str(self._model_path(msg)),
                    # None: hashed as it arrived; a model from the cache is checked again.
                    "model_sha256": None if base_digest in self._verified else base_digest,
                    **self._data_job(),
                    "cache_dir": str(self.dir.tensors),
                    "data_seed": 0,
                    "seed": seed,
                    # FedBN's layers and top-k's residual, kept here between rounds
                    "state_dir": str(local_state.run_folder(self.dir.root, msg.run_id)),
                    "round": msg.round,
                    **he_job,
                },
            )
        except TesseraError as exc:
            if self._session is not None and not self._session.closed:
                self._decline(msg, exc.code, str(exc))
                await self._flush()
            return
        finally:
            self._training_key = None
        # DP-SGD: the round's privacy cost is known now; past the site's cap, nothing leaves.
        refusal = self.governance.charge_trained(
            msg.plan_hash,
            time.time(),
            run_id=msg.run_id,
            rnd=msg.round,
            num_samples=outcome.num_samples,
            steps=outcome.steps,
        )
        if refusal is not None:
            outcome.update_path.unlink(missing_ok=True)
            if self._session is not None and not self._session.closed:
                self._decline(msg, *refusal)
                await self._flush()
            return
        encode_started = self.clock()
        worker = outcome.timings
        if timer is not None:
            inside = worker.get("verify", 0.0) + worker.get("encode", 0.0)
            timer.add("verify", worker.get("verify", 0.0))
            timer.add("train", encode_started - started - inside)
            timer.add("encode_update", worker.get("encode", 0.0))
            timer.cpu += worker.get("cpu", 0.0)
        if msg.plan.get("secure_aggregation"):  # masked, then offered (secagg_participant)
            await self.secagg.trained(msg, outcome)
            return
        data = await asyncio.to_thread(map_file, outcome.update_path)  # sent on, not copied
        digest = outcome.sha256 if outcome.size == len(data) and outcome.sha256 else None
        if digest is None:  # the worker did not say: hash it here, off the event loop
            digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        offer = make_offer("u-" + digest, data, self.limits.chunk_size, sha256=digest)
        base = msg.model_offer.sha256
        offer_msg = UpdateOffer(
            run_id=msg.run_id,
            round=msg.round,
            base_model=base,
            update=offer.body(),
            num_samples=outcome.num_samples,
            train_loss=outcome.train_loss,
            signature=sign(
                self.key,
                signed.UPDATE,
                signed.update_fields(
                    run_id=msg.run_id,
                    round=msg.round,
                    site_id=self.config.site_id,
                    plan_hash=msg.plan_hash,
                    base_model=base,
                    sha256=offer.sha256,
                    num_samples=outcome.num_samples,
                ),
            ),
        )
        pending = Pending(offer_msg, self.dir.outbox / f"{offer.sha256}.safetensors")
        outcome.update_path.replace(pending.path)
        (self.dir.outbox / f"{msg.run_id}-r{msg.round}.json").write_text(
            json.dumps({"message": offer_msg.body(), "path": str(pending.path)}), "utf-8"
        )
        if timer is not None:
            timer.add("encode_update", self.clock() - encode_started)
        self.on_status(f"round {msg.round}: sending the update ({len(data)} bytes)")
        self._phase(
            "uploading",
            msg.run_id,
            msg.round,
            train_loss=outcome.train_loss,
            num_samples=outcome.num_samples,
            bytes=len(data),
        )
        self._offer_update(pending, data)
        await self._flush()
        if msg.round >= 2:  # the model this round started from is round (r - 1)'s result
            # Off the round's path: validated once the update is delivered, so the upload
            # has this site's processor to itself; the next training waits for it.
            self._to_validate = (msg.run_id, msg.round - 1, msg.plan, self._model_path(msg))

    def _start_validation(self) -> None:
        """Start the validation the last round left for after its upload (if any)."""
        job, self._to_validate = self._to_validate, None
        if job is not None:
            self._validating = asyncio.ensure_future(self._validate(*job))

    async def _he_key_job(self, msg: RoundInvite) -> dict[str, str] | None:
        """The job's ``he_key`` for a homomorphically encrypted plan ({} for another), once
        this site holds the run's key: it is set up while the first round's model downloads.
        ``None`` after declining: a later round finds no key here, or none came in time."""
        if not msg.plan.get("homomorphic"):
            return {}
        if msg.round > 1 and not self.he.path(msg.run_id).is_file():
            key = None  # the key was set up in the first round, without this site
        else:
            key = await self.he.wait_key(msg.run_id, float(msg.deadline_s))
        if key is None:
            if self._session is not None and not self._session.closed:
                self._decline(
                    msg,
                    "privacy.he.no_key",
                    "this site does not hold the run's encryption key, so it can neither read "
                    "the global model nor encrypt its own",
                )
                await self._flush()
            return None
        return {"he_key": str(key)}

    def _he_validation_job(self, run_id: str, plan: dict[str, Any]) -> dict[str, str]:
        """What a validation job of an encrypted run needs to read its models: the key."""
        path = self.he.path(run_id)
        return {"he_key": str(path)} if plan.get("homomorphic") and path.is_file() else {}

    def _data_job(self) -> dict[str, str]:
        if self.data.from_index:
            return {
                "index_db": str(self.dir.index_db),
                "pseudonym_key": str(self.dir.pseudonym_key),
            }
        return {"dicom_dir": str(self.data.dicom_dir), "labels_csv": str(self.data.labels_csv)}

    def _load_pending(self, msg: RoundInvite) -> Pending | None:
        record = self.dir.outbox / f"{msg.run_id}-r{msg.round}.json"
        if not record.is_file():
            return None
        raw = json.loads(record.read_text("utf-8"))
        offer_msg = UpdateOffer(**raw["message"])
        if offer_msg.base_model != msg.model_offer.sha256 or not Path(raw["path"]).is_file():
            record.unlink()
            return None
        return Pending(offer_msg, Path(raw["path"]))

    def _offer_update(self, pending: Pending, data: bytes | memoryview | None = None) -> None:
        if self._session is None or self._session.closed:
            return  # offered again after the reconnect, from the outbox
        if data is None:
            data = map_file(pending.path)
        self._uploads[pending.offer_msg.update_offer.transfer_id] = (pending.offer_msg, data)
        self._session.send(pending.offer_msg)
        timer = self._clocks.get((pending.offer_msg.run_id, pending.offer_msg.round))
        if timer is not None:
            timer.mark("upload", self.clock())

    def _accepted(self, msg: UpdateAccepted) -> None:
        upload = self._uploads.get("u-" + msg.sha256)
        if upload is not None:
            self.governance.contributed(upload[0], time.time())
        record = self.dir.outbox / f"{msg.run_id}-r{msg.round}.json"
        record.unlink(missing_ok=True)
        self._uploads.pop("u-" + msg.sha256, None)
        # Not deleted: the next update is written over it (its pages are in the cache).
        self.trainer.recycle_update(self.dir.outbox / f"{msg.sha256}.safetensors")
        self.rounds_done.append((msg.run_id, msg.round))
        self._start_validation()
        timer = self._clocks.pop((msg.run_id, msg.round), None)
        if timer is not None:
            now = self.clock()
            timer.stop("upload", now)
            timer.cpu += time.process_time()
            timing = timer.record(now)
            self.timings.append(timing)
            try:
                append_timings(self.dir.root / TIMINGS_FILE, timing)
            except OSError as exc:  # a measurement: never worth failing a round for
                log.warning("cannot write the round's timings: %s", exc)
        self.on_status(f"round {msg.round}: update accepted by the coordinator")
        self._phase("accepted", msg.run_id, msg.round)

    # -- governance, provenance and validation -------------------------------------------

    def _on_notice(self, msg: GovernanceNotice) -> None:
        assert self._session is not None
        try:
            replies = self.governance.on_notice(msg, time.time())
        except TesseraError as exc:
            self.on_status(f"the coordinator's charter or plans were not accepted: {exc}")
            return
        verdicts = site_releases.verdicts(self.governance).values()
        for reply in [*replies, *pending_disputes(self.governance), *verdicts]:
            self._session.send(reply)
        charter = self.governance.record.charter()
        if charter is not None and charter.accepted_by is None:
            self.on_status(
                f"charter version {charter.version} awaits acceptance at this site "
                "('tessera-site charter show', then 'charter accept'); until then this site "
                "is left out of rounds"
            )
        for plan in self.governance.record.plans():
            if plan.decision == "pending":
                self.on_status(
                    f"plan {plan.plan_hash[:12]} ('{plan.plan.name}') awaits approval at this "
                    "site ('tessera-site plan show', then 'plan approve' or 'plan refuse')"
                )

    def _ask_head(self) -> None:
        """Ask for the latest signed head, a proof that it extends the one this site holds
        and proofs of this site's updates in it."""
        assert self._session is not None
        self._session.send(self.governance.head_request())

    def _on_head(self, msg: HeadUpdate) -> None:
        try:
            proven = self.governance.on_head_update(msg, time.time())
        except ProvenanceError as exc:
            self.on_status(f"ALERT: {exc}")
            self.governance.record.note("history_rewritten", time.time(), code=exc.code)
            raise ConnectionFailed(exc.message, code=exc.code) from exc
        if proven is None:  # it answered an earlier request, from an older head
            self._ask_head()
        elif proven:
            self.on_status(f"{proven} of this site's updates verified in the coordinator's log")

    async def _validate(
        self, run_id: str, rnd: int, plan: dict[str, Any], model_path: Path
    ) -> None:
        """Evaluate a global model on this site's held-out patients and report the metrics
        (and nothing else) to the coordinator, signed."""
        if self.governance.validated(run_id, rnd):
            return
        sha = model_path.stem
        self.on_status(f"validating the global model of round {rnd} on this site's held-out data")
        self._phase("validating", run_id, rnd)
        try:
            metrics = await self.trainer.validate(
                f"{run_id}-v{rnd}",
                {
                    "plan": plan,
                    "model_path": str(model_path),
                    "model_sha256": None if sha in self._verified else sha,
                    **self._data_job(),
                    "cache_dir": str(self.dir.tensors),
                    "data_seed": 0,
                    # FedBN: the model is validated with this site's own layers
                    "state_dir": str(local_state.run_folder(self.dir.root, run_id)),
                    "round": rnd,
                    **self._he_validation_job(run_id, plan),
                },
            )
        except TesseraError as exc:
            self.on_status(f"validation of round {rnd} failed: {exc}")
            return
        report = self.governance.validation_report(run_id, rnd, sha, metrics, time.time())
        self._phase("validated", run_id, rnd, metrics=report.metrics)
        auc = metrics.get("auc")
        self.on_status(
            f"round {rnd}: global model on this site's held-out data: AUC "
            + (f"{auc:.3f}" if isinstance(auc, float) else "undefined (one class)")
        )
        if self._session is not None and not self._session.closed:
            self._session.send(report)
            await self._flush()

    def _fetch_final(self, msg: RunFinished) -> bool:
        """Fetch the finished run's model to validate it; False if there is nothing to do."""
        offer = msg.model_offer
        session = self._session
        record = self.governance.record
        if offer is None or session is None or not record.approved(msg.plan_hash):
            return False
        if self.governance.validated(msg.run_id, msg.rounds):
            return False
        try:
            verify(
                self.config.coordinator_key,
                signed.FINAL_MODEL,
                signed.final_model_fields(
                    run_id=msg.run_id,
                    rounds=msg.rounds,
                    plan_hash=msg.plan_hash,
                    sha256=offer.sha256,
                ),
                msg.model_signature,
            )
        except TesseraError as exc:
            self.on_status(f"the final model is not signed by the coordinator: {exc}")
            return False
        if self._model_path(msg).is_file():
            self._final_arrived(msg)
            return True
        try:
            download = open_download(session, msg, offer, self._model_part(msg))
        except TesseraError as exc:
            self.on_status(f"cannot fetch the final model: {exc}")
            return False
        self._downloads[offer.transfer_id] = download
        return True

    def _final_arrived(self, msg: RunFinished) -> None:
        part, final = self._model_part(msg), self._model_path(msg)
        if part.exists():
            part.replace(final)
        record = self.governance.record.plan(msg.plan_hash)
        assert record is not None
        self._spawn(self._validate_final(msg, record.plan.to_dict(), final))

    async def _validate_final(self, msg: RunFinished, plan: dict[str, Any], path: Path) -> None:
        try:
            self._start_validation()
            if self._validating is not None and not self._validating.done():
                await self._validating
            await self._validate(msg.run_id, msg.rounds, plan, path)
        finally:
            if self.exit_when_done and self._session is not None and self._ws is not None:
                self._session.close("site.done", "the run is finished")
                await self._flush()
                await self._ws.close()
