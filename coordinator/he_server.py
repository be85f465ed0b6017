"""The coordinator's I/O for homomorphically encrypted runs, beside ``server.py``.

Theory of operation: when a run's plan has ``homomorphic``, ``CoordinatorServer`` hands the
encrypted parts of the round to one ``HELink`` (a few one-line hooks). Before the first round
can be aggregated, the link drives one pure :class:`~coordinator.he_keys.HEKeySetup` to give
the run's sites one CKKS key that the coordinator never holds, and keeps what it may keep:
the public context (parameters only) in the blob store and a ``he_key_ready`` provenance entry
naming the key's id and the sites that hold it, so a restarted coordinator carries on.

Rounds then go through the plain path (``shared.privacy.he_rounds``): each site uploads its
local model, encrypted, as an ordinary update (durable before it is acknowledged); the link
checks an upload with the public context (``check_upload``) instead of decoding it, and the
round's aggregate is the weighted sum of the encrypted uploads (``aggregate``), which becomes
the next round's model, as opaque to the coordinator as the uploads. Round 1 starts from the
plan's plaintext initial model, which holds no data. A key attempt that fails fails the round
attempt; the engine retries it and the retry starts a new key attempt.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.engine import OpenRound
from coordinator.he_keys import Failed, HEKeyAction, HEKeySetup, LeftOut, Ready, Send
from coordinator.store import UpdateRecord
from shared.aggregation import layout_of
from shared.errors import HomomorphicError, TesseraError
from shared.privacy.he_rounds import (
    aggregate_local_models,
    check_encrypted_upload,
    max_upload_bytes,
    sample_weights,
    uniform_weights,
)
from shared.protocol.messages import ErrorMessage, HEKeyAck, HEPublicKey, HESealedKey, Message
from shared.tensors import decode_tensors

if TYPE_CHECKING:
    from coordinator.server import Connection, CoordinatorServer

log = logging.getLogger("tessera.coordinator.he")

HE_MESSAGES = (HEPublicKey, HESealedKey, HEKeyAck)
# How long each key phase waits for the sites, as a share of the plan's round deadline: the
# messages are small (a sealed key is about 550 KB) and are exchanged while sites train.
PHASE_SHARE = 0.2
KEY_READY = "he_key_ready"


class HELink:
    def __init__(self, server: CoordinatorServer) -> None:
        self.server = server
        self.setup: HEKeySetup | None = None
        self._round = 0  # the round whose opening started ``setup``
        self._started = 0.0  # when ``setup`` started: uploads from before are under no key
        self._layouts: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}

    @property
    def on(self) -> bool:
        return self.server.plan is not None and self.server.plan.homomorphic

    # -- the run's key -------------------------------------------------------------------

    def key(self, run_id: str) -> dict[str, Any] | None:
        """The run's ``he_key_ready`` entry (key id, public context digest, holders)."""
        ready = [
            e["detail"]
            for e in self.server.fed.store.events(KEY_READY)
            if e["detail"].get("run_id") == run_id
        ]
        return ready[-1] if ready else None

    def public_context(self, run_id: str) -> bytes:
        """The run's public context: kept once the key is ready, or the one the key site
        sent while its sites acknowledge (a site may upload before the last ack is in)."""
        entry = self.key(run_id)
        setup = self.setup
        pending = setup.public_context if setup is not None and setup.run_id == run_id else None
        if entry is None and pending is not None:
            return pending
        if entry is None:
            raise HomomorphicError(
                "This run's CKKS key is not set up yet; its encrypted models cannot be added.",
                code="privacy.he.no_key",
            )
        return self.server.fed.blobs.get(str(entry["public_context"]))

    def open(self, action: OpenRound) -> None:
        """A round opens: without the run's key, start an attempt at setting it up among
        the round's sites (they train meanwhile and encrypt once they hold it)."""
        s, run = self.server, self.server.run
        assert run is not None
        if self.key(run.run_id) is not None or self.setup is not None:
            return
        keys = {}
        for site in action.selected:
            record = s.fed.store.site(site)
            if record is not None:
                keys[site] = record.public_key
        plan = s.plan
        assert plan is not None
        try:
            setup = HEKeySetup(
                run_id=run.run_id,
                attempt=os.urandom(8).hex(),
                site_keys=keys,
                key_site=min(keys) if keys else "",
                signing_key=s.key,
                phase_s=plan.round_deadline_s * PHASE_SHARE,
                now=s.clock(),
            )
        except TesseraError as exc:
            self._apply([Failed(f"cannot set up the run's CKKS key: {exc}")])
            return
        self.setup, self._round, self._started = setup, action.round, s.clock()
        log.info("run %s: setting up its CKKS key (key site %s)", run.run_id, setup.key_site)
        self._apply(setup.start())
        s._wake.set()  # the phase deadline counts from now

    def without_key(self, site: str) -> bool:
        """Whether ``site`` is outside the run's key: not among its holders, or not among
        the sites of the setup under way (it joined the round after the setup began)."""
        run = self.server.run
        if run is None:
            return False
        entry = self.key(run.run_id)
        if entry is not None:
            return site not in entry.get("sites", [])
        setup = self.setup
        return setup is not None and site not in setup.sites

    def retried(self) -> None:
        self.setup = None

    def tick(self, now: float) -> None:
        if self.setup is not None:
            self._apply(self.setup.tick(now))

    def next_deadline(self) -> float | None:
        setup = self.setup
        return setup.deadline if setup is not None and not setup.done else None

    def on_message(self, conn: Connection, msg: Message, now: float) -> None:
        site, setup = conn.site_id or "", self.setup
        try:
            if setup is None:
                raise HomomorphicError(
                    f"No CKKS key is being set up; this {msg.TYPE} was not used.",
                    code="privacy.he.key_unexpected",
                )
            if isinstance(msg, HEPublicKey):
                actions = setup.on_public_key(site, msg, now)
            elif isinstance(msg, HESealedKey):
                actions = setup.on_sealed_key(site, msg, now)
            elif isinstance(msg, HEKeyAck):
                actions = setup.on_ack(site, msg, now)
            else:  # pragma: no cover - HE_MESSAGES lists the three
                return
        except TesseraError as exc:
            log.warning("%s from %s refused: %s (%s)", msg.TYPE, site, exc, exc.code)
            conn.session.send(ErrorMessage(code=exc.code, message=exc.message, ref=msg.TYPE))
            self.server._spawn(self.server._flush(conn))
            return
        self._apply(actions)

    def _apply(self, actions: Sequence[HEKeyAction]) -> None:
        s = self.server
        for action in actions:
            if isinstance(action, Send):
                s.send_to(action.site, action.message)
            elif isinstance(action, LeftOut):
                log.info("site %s does not get the CKKS key: it %s", action.site, action.reason)
                if s.engine is not None:
                    s._apply(s.engine.site_declined(action.site, self._round, s.clock()))
            elif isinstance(action, Ready):
                self._ready(action)
            elif isinstance(action, Failed):
                log.warning("run's CKKS key not set up: %s", action.reason)
                self.setup = None
                if s.engine is not None and s.run is not None:
                    rnd = self._round or s.run.current_round
                    s._apply(s.engine.aggregate_failed(rnd, action.reason, s.clock()))

    def _ready(self, ready: Ready) -> None:
        s, setup = self.server, self.setup
        assert setup is not None and s.run is not None
        digest = s.fed.blobs.put(ready.public_context)
        s.fed.store.log(
            KEY_READY,
            s.clock(),
            run_id=s.run.run_id,
            attempt=setup.attempt,
            key_site=setup.key_site,
            key_id=setup.key_id,
            started=self._started,
            public_context=digest,
            sites=list(ready.sites),
        )
        log.info("run %s: CKKS key held by %s", s.run.run_id, ", ".join(ready.sites))
        self.setup = None

    # -- rounds --------------------------------------------------------------------------

    def layout(self, run_id: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """The model's entries (names, shapes, dtypes), from round 1's plaintext model."""
        if run_id not in self._layouts:
            first = self.server.fed.store.round_row(run_id, 1)
            if first is None:
                raise HomomorphicError(
                    "The run has no first round to take the model's layout from.",
                    code="privacy.he.no_key",
                )
            data = self.server.fed.blobs.get(str(first["model_in"]))
            self._layouts[run_id] = layout_of(decode_tensors(data, copy=False))
        return self._layouts[run_id]

    def max_upload(self, run_id: str) -> int:
        """The most bytes an upload of this run may have (``he_rounds.max_upload_bytes``)."""
        return max_upload_bytes(self.public_context(run_id), self.layout(run_id))

    async def check_upload(self, run_id: str, path: Path) -> None:
        """Refuse an upload that is not this round's encrypted model (before it is kept)."""
        public, layout = self.public_context(run_id), self.layout(run_id)
        data = await asyncio.to_thread(path.read_bytes)
        await asyncio.to_thread(check_encrypted_upload, public, data, layout)

    async def aggregate(self, run_id: str, updates: Sequence[UpdateRecord]) -> bytes:
        """The next round's encrypted global model: the plan's weighted mean of the uploads,
        added blind in sorted site order."""
        plan, blobs = self.server.plan, self.server.fed.blobs
        assert plan is not None
        public = self.public_context(run_id)
        entry = self.key(run_id)
        started = float(entry.get("started", 0.0)) if entry else self._started
        # An upload stored before this key's setup began (a coordinator restarted while an
        # earlier attempt was under way) is under a key that was never confirmed: left out.
        stale = [u.site_id for u in updates if u.received_at < started]
        if stale:
            log.warning("uploads of %s predate the run's key; left out", ", ".join(stale))
            updates = [u for u in updates if u.received_at >= started]
        if not updates:
            raise HomomorphicError(
                "Every upload of this round predates the run's key; the round is retried.",
                code="privacy.he.no_key",
            )
        uploads = {u.site_id: await asyncio.to_thread(blobs.get, u.digest) for u in updates}
        if plan.weighting == "uniform":
            weights = uniform_weights(uploads)
        else:
            weights = sample_weights({u.site_id: u.num_samples for u in updates})
        return await asyncio.to_thread(aggregate_local_models, public, uploads, weights)
