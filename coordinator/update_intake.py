"""The coordinator's intake of plain (and homomorphically encrypted) updates, beside
``server.py``.

Theory of operation: an ``UpdateOffer`` is checked (run, round, base model, the site's
signature, size) and takes an upload slot (``coordinator.limits.UploadSlots``) or waits for
one; the upload then streams into a partial file in the blob store, each chunk hashed and
written in a worker thread (:func:`store_chunk`), resumable at the last chunk on disk. When
the last chunk is in, the file is fsynced while the update is checked against the round's
model and, once every expected site has offered, folded into the round's weighted mean
(``coordinator.aggregation.RoundFold``), so the aggregate waits for no re-read. Only then,
with the file, its directory and its row durable, is the update acknowledged. A rejected
update leaves nothing behind but the reason, recorded with the site's id.

Masked updates of secure-aggregation rounds take their own path (``secagg_server.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.aggregation import RoundFold, check_update, fold_stored, fold_weights
from coordinator.limits import UploadSlots
from coordinator.store import UpdateRecord
from shared.aggregation import (
    StrategyConfig,
    layout_of,
    make_strategy,
    upload_layout,
)
from shared.crypto.signing import verify
from shared.errors import TesseraError
from shared.files import start_writeback
from shared.protocol import signed
from shared.protocol.messages import ErrorMessage, UpdateAccepted, UpdateOffer

if TYPE_CHECKING:
    from coordinator.server import Connection, CoordinatorServer

log = logging.getLogger("tessera.coordinator")


@dataclass
class Upload:
    offer: UpdateOffer
    path: Path
    fh: Any
    sha256: Any  # hashlib's running digest of what is on disk (the session checks it)


class UpdateIntake:
    """Offers, uploads and their checks for ``CoordinatorServer`` (``server.intake``)."""

    def __init__(self, server: CoordinatorServer, slots: UploadSlots) -> None:
        self.server = server
        self.slots = slots
        # The open round's fold of checked updates (``fold_for``) and the thread folding
        # those stored before it could be made (aggregation.fold_stored).
        self.fold: RoundFold | None = None
        self.fold_catchup: asyncio.Future[int] | None = None
        # The sample counts offered in the open round, by site: they fix the fold's weights.
        self.offered: tuple[tuple[str, int], dict[str, int]] = (("", 0), {})
        # Digests of the open round's updates hashed on arrival and checked by this process.
        self.checked: tuple[tuple[str, int], set[str]] = (("", 0), set())

    def offer(self, conn: Connection, msg: UpdateOffer, now: float) -> None:
        run, plan, site_id = self.server.run, self.server.plan, conn.site_id
        assert site_id is not None
        offer = msg.update_offer
        if run is None or plan is None or msg.run_id != run.run_id:
            self.refuse(conn, msg, "update.stale", "this run is not active")
            return
        stored = {u.site_id: u for u in self.server.fed.store.updates(run.run_id, msg.round)}
        if site_id in stored:  # a replay after a reconnect: harmless, answer the same
            if stored[site_id].digest == offer.sha256:
                conn.session.send(
                    UpdateAccepted(run_id=run.run_id, round=msg.round, sha256=offer.sha256)
                )
                if self.server.engine is not None:  # idempotent: the engine counts a site once
                    self.server._apply(self.server.engine.update_stored(site_id, msg.round, now))
            else:
                self.refuse(
                    conn,
                    msg,
                    "update.duplicate",
                    "an update for this round was already accepted from this site",
                )
            return
        if msg.round != run.current_round or msg.base_model != run.model_digest:
            self.refuse(
                conn,
                msg,
                "update.stale",
                f"round {msg.round} is not the open round {run.current_round}",
            )
            return
        try:
            verify(
                self.server.fed.store.site(site_id).public_key,  # type: ignore[union-attr]
                signed.UPDATE,
                signed.update_fields(
                    run_id=msg.run_id,
                    round=msg.round,
                    site_id=site_id,
                    plan_hash=plan.plan_hash,
                    base_model=msg.base_model,
                    sha256=offer.sha256,
                    num_samples=msg.num_samples,
                ),
                msg.signature,
            )
        except TesseraError as exc:
            self.reject(conn, msg, exc.code, "the update's signature does not verify")
            return
        limit = 2 * (self.server.model.offer.size if self.server.model else 0) + 1024 * 1024
        if self.server.he.on:  # an encrypted local model: about twelve times the model's floats
            try:
                limit = max(limit, self.server.he.max_upload(run.run_id))
            except TesseraError as exc:
                self.reject(conn, msg, exc.code, exc.message)
                return
        if offer.size > limit:
            self.reject(
                conn,
                msg,
                "update.too_large",
                f"update of {offer.size} bytes is larger than the model allows",
            )
            return
        if self.offered[0] != (run.run_id, msg.round):
            self.offered = ((run.run_id, msg.round), {})
        self.offered[1][site_id] = msg.num_samples
        verdict = self.slots.request(site_id, offer.transfer_id)
        if verdict.code == "update.queued":
            # Say nothing: the site waits for its TransferAccept, sent when a slot frees.
            log.info("update from %s queued: %d uploads in progress", site_id, self.slots.active)
            conn.queued[offer.transfer_id] = msg
            return
        if not verdict.allowed:
            # No ``ref``: the update itself is fine (an error answering ``update_offer``
            # would make the site delete it).
            conn.session.send(ErrorMessage(code=verdict.code, message=verdict.reason))
            return
        self.start(conn, msg)

    def start(self, conn: Connection, msg: UpdateOffer) -> None:
        """Open (or reopen, to resume) the partial file of an offer holding a slot and
        accept it from the first chunk not yet on disk."""
        site_id, offer = conn.site_id or "", msg.update_offer
        previous = conn.uploads.pop(offer.transfer_id, None)
        if previous is not None:  # the site restarted this upload on the same connection
            previous.fh.close()
            conn.session.abandon_transfer(offer.transfer_id)
        path = self.server.fed.blobs.partial_path(f"{site_id}-{offer.transfer_id}.part")
        have = path.read_bytes() if path.exists() else b""
        try:
            next_index = conn.session.expect_transfer(offer, have, owner_hashes=True)
        except TesseraError:
            self.release(site_id, offer.transfer_id)
            return
        keep = min(len(have), next_index * offer.chunk_size)
        fh = open(path, "r+b" if path.exists() else "wb")  # noqa: SIM115 (held across events)
        fh.truncate(keep)
        fh.seek(keep)
        sha256 = hashlib.sha256(memoryview(have)[:keep])
        conn.uploads[offer.transfer_id] = Upload(msg, path, fh, sha256)

    def release(self, site_id: str, transfer_id: str) -> None:
        """Give an upload's slot back and start the queued offers it makes room for (those
        of sites gone meanwhile, or for a round that has closed, give theirs back too)."""
        granted = self.slots.release(site_id, transfer_id)
        while granted:
            site, tid = granted.pop(0)
            conn = self.server.connections.get(site)
            msg = conn.queued.pop(tid, None) if conn is not None else None
            if conn is None or msg is None:
                granted += self.slots.release(site, tid)
                continue
            run = self.server.run
            if run is None or msg.run_id != run.run_id or msg.round != run.current_round:
                granted += self.slots.release(site, tid)
                self.refuse(conn, msg, "update.stale", "the round closed while this waited")
            else:
                self.start(conn, msg)
            self.server._spawn(self.server._flush(conn))

    async def finish(self, conn: Connection, upload: Upload) -> None:
        assert (
            self.server.run is not None
            and self.server.plan is not None
            and self.server.engine is not None
        )
        run, plan = self.server.run, self.server.plan
        msg, site_id = upload.offer, conn.site_id or ""
        upload.fh.flush()
        # The fsync waits for the disk while the check reads the page cache.
        synced = asyncio.ensure_future(asyncio.to_thread(_fsync_and_close, upload.fh))
        try:
            if self.server.he.on:  # an encrypted local model: checked for its form, kept as sent
                await self.server.he.check_upload(run.run_id, upload.path)
                fold, norm = None, float("nan")
            else:
                # What sites upload: the model's entries, less FedBN's local ones.
                strategy = make_strategy(
                    plan.aggregation, plan.aggregation_params, weighting=plan.weighting
                )
                base = await self.server._model_arrays(run.model_digest)
                layout = upload_layout(strategy, layout_of(base))
                fold = self.fold_for(msg.round, strategy, layout)
                norm = await asyncio.to_thread(
                    functools.partial(
                        check_update,
                        upload.path,
                        self.server.fed.blobs,
                        run.model_digest,
                        plan.max_update_norm,
                        layout=layout,
                        codec=plan.codec,
                        fold=None if fold is None else (fold, site_id, msg.update_offer.sha256),
                    )
                )
        except TesseraError as exc:
            with contextlib.suppress(OSError):
                await synced  # closed before it is deleted
            upload.path.unlink(missing_ok=True)  # nothing of a rejected update is kept
            self.reject(conn, msg, exc.code, exc.message)
            return
        digest = msg.update_offer.sha256
        try:
            # Durable (file and directory fsynced, row committed) before it is acknowledged.
            await synced
            # Folded now, or read again once the fold can be made: cached until then.
            await asyncio.to_thread(
                functools.partial(
                    self.server.fed.blobs.adopt, upload.path, digest, drop_cache=fold is not None
                )
            )
            if fold is None and not self.server.he.on:  # folded later, from its mapped file
                if self.checked[0] != (run.run_id, msg.round):
                    self.checked = ((run.run_id, msg.round), set())
                self.checked[1].add(digest)
            self.server.fed.store.add_update(
                UpdateRecord(
                    run.run_id,
                    msg.round,
                    site_id,
                    digest,
                    msg.num_samples,
                    msg.train_loss,
                    self.server.clock(),
                ),
                msg.signature,
            )
        except (TesseraError, OSError) as exc:
            log.error("cannot store update of %s: %s", site_id, exc)
            conn.session.send(
                ErrorMessage(
                    code=getattr(exc, "code", "storage.write"),
                    message="the coordinator could not store the update; keep it, it will "
                    "ask again",
                    ref=msg.TYPE,
                )
            )
            self.server._pause(
                exc
            )  # a failed disk write: stop the run rather than go on without it
            return
        log.info("update from %s for round %d stored (norm %.4g)", site_id, msg.round, norm)
        conn.session.send(UpdateAccepted(run_id=msg.run_id, round=msg.round, sha256=digest))
        await self.server._flush(conn)
        self.server._apply(
            self.server.engine.update_stored(site_id, msg.round, self.server.clock())
        )

    def fold_for(self, rnd: int, strategy: StrategyConfig, layout: Any) -> RoundFold | None:
        """The open round's fold (``coordinator.aggregation.RoundFold``), made once every site
        expected in it (selected, not declined) has offered its update, whose sample counts
        fix the weights; made anew when the expected sites change. ``None`` until then, and
        for the strategies that take no weighted mean."""
        run, state = (
            self.server.run,
            self.server.engine.open if self.server.engine is not None else None,
        )
        key, offered = self.offered
        if run is None or state is None or state.round != rnd or key != (run.run_id, rnd):
            return None
        expected = state.selected - state.declined
        if not expected or not expected <= offered.keys():
            return None
        raw = fold_weights(strategy, {s: offered[s] for s in expected})
        if raw is None:
            return None
        fold, fold_key = self.fold, (run.run_id, rnd, run.model_digest)
        if fold is None or fold.key != fold_key or fold.raw != raw:
            fold = self.fold = RoundFold(layout, raw, key=fold_key)
            # Updates stored before the last offer came are folded from disk meanwhile.
            stored = [u for u in self.server.fed.store.updates(run.run_id, rnd) if u.site_id in raw]
            if stored:
                codec = self.server.plan.codec if self.server.plan is not None else None
                checked = self.checked[1] if self.checked[0] == (run.run_id, rnd) else set()
                self.fold_catchup = asyncio.ensure_future(
                    asyncio.to_thread(
                        functools.partial(
                            fold_stored,
                            fold,
                            self.server.fed.blobs,
                            stored,
                            layout,
                            codec,
                            checked=frozenset(checked),
                        )
                    )
                )
        return fold

    def refuse(self, conn: Connection, msg: Any, code: str, reason: str) -> None:
        conn.session.send(ErrorMessage(code=code, message=reason, ref=msg.TYPE))

    def reject(self, conn: Connection, msg: UpdateOffer, code: str, reason: str) -> None:
        """Refuse an update and record why; nothing of the update itself is stored."""
        log.warning("update from %s rejected: %s (%s)", conn.site_id, reason, code)
        self.server.fed.store.reject_update(
            msg.run_id, msg.round, conn.site_id or "", code, reason, self.server.clock()
        )
        conn.session.send(ErrorMessage(code=code, message=reason, ref=msg.TYPE))


def store_chunk(upload: Upload, data: bytes) -> None:
    """One chunk of an upload hashed and written; in a worker thread."""
    upload.sha256.update(data)
    fh = upload.fh
    fh.write(data)
    fh.flush()
    # The disk gets the update as it arrives, so the fsync before its acknowledgement waits
    # for the last chunk or two rather than for the whole update.
    start_writeback(fh.fileno(), fh.tell() - len(data), len(data))


def _fsync_and_close(fh: Any) -> None:
    try:
        os.fsync(fh.fileno())
    finally:
        fh.close()
