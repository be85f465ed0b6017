"""Hundreds of sites against one coordinator: round time and the coordinator's memory.

Run: ``python -m benchmarks.scale --sites 200 --rounds 3`` (the defaults). A real coordinator
process (``tessera-coordinator serve``, started by ``coordinator.localrun``) serves a run of
the registry's ``mlp`` at a small width (``--width``, 8 by default: about 8k parameters) on
32 x 32 inputs. The sites are lightweight: all of them are asyncio tasks in this one process,
but each is a whole site as far as the coordinator can tell. It enrols with its own invitation
code and its own Ed25519 key (``site_client.core.enrolment.enrol``), holds its own pinned TLS
websocket, drives the real ``SiteSession`` (challenge and signature, plan and model signatures
checked, the model downloaded in checked chunks and acknowledged) and offers a signed update
that the coordinator checks, stores durably and aggregates. The one shortcut is training: a
site sends a fixed small update of the model's exact shapes (``1e-4 * (k + 1)`` everywhere for
site ``k``) instead of computing one, so the benchmark measures the coordinator, not torch.
A site that loses its connection reconnects with the participant's jittered backoff
(``site_client.core.participant.Backoff``) and resumes.

- ``round_seconds``: the coordinator's round time (opened -> committed, from its
  ``timings.jsonl``), median over the rounds; every site is connected before round 1 opens
  (the plan's quorum and ``min_sites`` are all of them), so every round counts.
- ``coordinator_peak_rss_mb``: the coordinator process's peak resident memory (``VmHWM`` in
  ``/proc/PID/status``), read just before it is stopped.
- ``failed_sites``: sites that did not see every round's update accepted and the run finish.

Enrolment (``enrol_seconds``) and this process's own peak memory are printed for context. On
a shared machine the figures move with the load; compare runs only on the same idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INPUT_SIZE = 32
ENROL_CONCURRENCY = 50
MAX_ATTEMPTS = 8  # reconnections per site before it counts as failed


@dataclass
class SiteOutcome:
    name: str
    accepted: list[int] = field(default_factory=list)  # rounds whose update was accepted
    finished: bool = False
    reconnects: int = 0
    errors: list[str] = field(default_factory=list)

    def ok(self, rounds: int) -> bool:
        return self.finished and sorted(self.accepted) == list(range(1, rounds + 1))


class LightSite:
    """One site of the federation: real identity, connection and protocol; no training."""

    def __init__(self, site_dir: Path, index: int, rng: random.Random) -> None:
        from shared.crypto.keys import load_private_key
        from site_client.core.config import SiteDir

        self.dir = SiteDir(site_dir)
        self.config = self.dir.load()
        self.key = load_private_key(self.dir.key_file)
        self.index = index
        self.rng = rng
        self.outcome = SiteOutcome(self.config.site_name)
        self._model = bytearray()
        self._invite = None  # the RoundInvite being served
        self._uploads: dict[str, tuple[object, bytes]] = {}

    async def run(self) -> SiteOutcome:
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        from site_client.core.participant import Backoff

        backoff, attempt = Backoff(), 0
        while not self.outcome.finished:
            try:
                await self._connect_once()
                attempt = 0
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                self.outcome.errors.append(repr(exc))
            if self.outcome.finished:
                break
            attempt += 1
            self.outcome.reconnects += 1
            if attempt > MAX_ATTEMPTS:
                self.outcome.errors.append(f"gave up after {MAX_ATTEMPTS} attempts")
                break
            await asyncio.sleep(backoff.delay(attempt, self.rng))
        return self.outcome

    async def _connect_once(self) -> None:
        from shared.crypto.tls import connect_pinned
        from shared.protocol.codec import DEFAULT_LIMITS
        from shared.protocol.session import SiteSession

        async with connect_pinned(
            self.config.coordinator_url,
            self.config.fingerprint,
            open_timeout=60,
            max_size=DEFAULT_LIMITS.max_frame_bytes,
            ping_interval=20,
            ping_timeout=60,
            compression=None,  # as the participant
        ) as ws:
            session = SiteSession()
            self._uploads.clear()
            async for frame in ws:
                session.receive_frame(frame)
                for event in session.events_received():
                    await self._on_event(session, ws, event)
                for data in session.data_to_send():
                    await ws.send(data)
                if session.closed:
                    break

    async def _on_event(self, session, ws, event) -> None:  # type: ignore[no-untyped-def]
        from shared.crypto.signing import sign
        from shared.protocol import signed
        from shared.protocol.messages import (
            Challenge,
            ErrorMessage,
            RoundInvite,
            RunFinished,
            TransferAccept,
            UpdateAccepted,
        )
        from shared.protocol.session import (
            ChunkReceived,
            MessageReceived,
            PeerViolation,
            TransferComplete,
            TransferFailed,
        )

        if isinstance(event, ChunkReceived):
            self._model += event.data
            session.ack(event.transfer_id)
        elif isinstance(event, TransferComplete):
            self._offer_update(session)
        elif isinstance(event, TransferFailed | PeerViolation):
            self.outcome.errors.append(f"{event.code}: {event.reason}")
        elif isinstance(event, MessageReceived):
            msg = event.message
            if isinstance(msg, Challenge):
                fields = signed.auth_fields(
                    nonce=msg.nonce,
                    site_id=self.config.site_id,
                    fingerprint=self.config.fingerprint,
                )
                session.authenticate(
                    site_id=self.config.site_id, signature=sign(self.key, signed.AUTH, fields)
                )
            elif isinstance(msg, RoundInvite):
                self._on_invite(session, msg)
            elif isinstance(msg, TransferAccept) and msg.transfer_id in self._uploads:
                offer_msg, data = self._uploads[msg.transfer_id]
                for frame in session.chunks(offer_msg.update_offer, data, msg.next_index):  # type: ignore[attr-defined]
                    await ws.send(frame)
            elif isinstance(msg, UpdateAccepted):
                self._uploads.pop("u-" + msg.sha256, None)
                if msg.round not in self.outcome.accepted:
                    self.outcome.accepted.append(msg.round)
            elif isinstance(msg, RunFinished):
                self.outcome.finished = True
                session.close("site.done", "the run is finished")
            elif isinstance(msg, ErrorMessage):
                self.outcome.errors.append(f"{msg.code}: {msg.message}")

    def _on_invite(self, session, msg) -> None:  # type: ignore[no-untyped-def]
        """Check what the coordinator signed, as a site does, then take the model."""
        from shared.crypto.signing import verify
        from shared.plan import TrainingPlan
        from shared.protocol import signed

        plan = TrainingPlan.from_dict(msg.plan)
        assert plan.plan_hash == msg.plan_hash, "the plan does not match its hash"
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
        self._invite = msg
        self._model = bytearray()
        if session.expect_transfer(msg.model_offer) == msg.model_offer.total_chunks:
            self._offer_update(session)  # an empty model: nothing to download

    def _offer_update(self, session) -> None:  # type: ignore[no-untyped-def]
        from shared.crypto.signing import sign
        from shared.protocol import signed
        from shared.protocol.codec import DEFAULT_LIMITS
        from shared.protocol.messages import UpdateOffer
        from shared.protocol.transfer import make_offer
        from shared.tensors import decode_tensors, encode_tensors

        msg = self._invite
        assert msg is not None
        model = decode_tensors(bytes(self._model))
        step = np.float32(1e-4 * (self.index + 1))
        data = encode_tensors({name: np.full_like(a, step) for name, a in model.items()})
        digest = hashlib.sha256(data).hexdigest()
        offer = make_offer("u-" + digest, data, DEFAULT_LIMITS.chunk_size, sha256=digest)
        num_samples = 10 + self.index % 7
        fields = signed.update_fields(
            run_id=msg.run_id,
            round=msg.round,
            site_id=self.config.site_id,
            plan_hash=msg.plan_hash,
            base_model=msg.model_offer.sha256,
            sha256=offer.sha256,
            num_samples=num_samples,
        )
        offer_msg = UpdateOffer(
            run_id=msg.run_id,
            round=msg.round,
            base_model=msg.model_offer.sha256,
            update=offer.body(),
            num_samples=num_samples,
            train_loss=0.5,
            signature=sign(self.key, signed.UPDATE, fields),
        )
        self._uploads[offer.transfer_id] = (offer_msg, data)
        session.send(offer_msg)


async def enrol_sites(codes: Sequence[tuple[str, str]], root: Path) -> list[Path]:
    """Enrol every site (name, invitation code) with the real enrolment, a few at a time."""
    from site_client.core.config import SiteDir
    from site_client.core.enrolment import enrol

    gate = asyncio.Semaphore(ENROL_CONCURRENCY)

    async def one(name: str, code: str) -> Path:
        site_dir = root / name
        async with gate:
            await enrol(code, SiteDir(site_dir), name)
        return site_dir

    return list(await asyncio.gather(*(one(name, code) for name, code in codes)))


async def run_sites(dirs: Sequence[Path], timeout: float) -> list[SiteOutcome]:
    sites = [LightSite(d, k, random.Random(k)) for k, d in enumerate(dirs)]
    tasks = [asyncio.ensure_future(s.run()) for s in sites]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    outcomes = []
    for site, task in zip(sites, tasks, strict=True):
        if task in done and task.exception() is not None:
            site.outcome.errors.append(repr(task.exception()))
        elif task in pending:
            site.outcome.errors.append(f"not finished after {timeout:.0f} s")
        outcomes.append(site.outcome)
    return outcomes


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a live process (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def own_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    p.add_argument("--sites", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--width", type=int, default=8, help="hidden units of the mlp")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds for the whole run")
    args = p.parse_args(argv)
    if args.sites < 1 or args.rounds < 1 or args.width < 1:
        sys.exit("use --sites >= 1, --rounds >= 1 and --width >= 1")

    from coordinator.localrun import LocalFederation
    from shared.phases import COORDINATOR_PHASES, read_timings
    from shared.plan import demo_plan

    params = args.width * (INPUT_SIZE * INPUT_SIZE + 2) + 1
    print(
        f"scale: {args.sites} sites (asyncio tasks in one process) against one coordinator "
        f"process, {args.rounds} rounds, mlp width {args.width} ({params:,} parameters)"
    )
    plan = demo_plan(
        rounds=args.rounds,
        name="scale",
        architecture="mlp",
        architecture_params={"width": args.width},
        input_size=INPUT_SIZE,
        quorum=args.sites,
        min_sites=args.sites,
        round_deadline_s=args.timeout,
    )
    with tempfile.TemporaryDirectory(prefix="tessera-scale-") as tmp:
        lf = LocalFederation(Path(tmp) / "federation", federation="Scale")
        fed = lf.init()
        try:
            lf.start_coordinator()
            assert lf.coordinator is not None
            names = [f"site-{k:03d}" for k in range(args.sites)]
            codes = [(name, fed.invite(name)) for name in names]
            started = time.monotonic()
            dirs = asyncio.run(enrol_sites(codes, Path(tmp) / "sites"))
            enrol_s = time.monotonic() - started
            print(f"{args.sites} sites enrolled in {enrol_s:.1f} s")
            run_id = lf.start_run(fed, plan)
            started = time.monotonic()
            outcomes = asyncio.run(run_sites(dirs, args.timeout))
            total_s = time.monotonic() - started
            rss_mb = peak_rss_mb(lf.coordinator.pid)
            run = fed.store.run(run_id)
            rounds = [r for r in fed.store.rounds(run_id) if r["status"] == "closed"]
        finally:
            lf.stop()
            fed.close()
        records = [
            r
            for r in read_timings(lf.coordinator_dir / "timings.jsonl")
            if r.side == "coordinator" and r.run_id == run_id
        ]
        log_tail = (lf.root / "coordinator.log").read_text(errors="replace")[-2000:]
    failed = [o for o in outcomes if not o.ok(args.rounds)]
    print(
        f"run {run.status if run else 'missing'} after {total_s:.1f} s; closed rounds: "
        + ", ".join(f"r{r['round']} {r['n_updates']} updates" for r in rounds)
    )
    print(f"reconnections: {sum(o.reconnects for o in outcomes)}")
    for outcome in failed[:5]:
        print(f"failed: {outcome.name}: {outcome.errors[-3:]}", file=sys.stderr)
    if failed:
        print(f"--- coordinator.log (end)\n{log_tail}", file=sys.stderr)
    if len(records) != args.rounds:
        print(f"timings of {len(records)} of {args.rounds} rounds", file=sys.stderr)
        return 1
    seconds = [r.seconds for r in sorted(records, key=lambda r: r.round)]
    print("round seconds (opened -> committed): " + " ".join(f"{s:.2f}" for s in seconds))
    phases = {
        name: statistics.median(r.phases.get(name, 0.0) for r in records)
        for name in COORDINATOR_PHASES
    }
    rest = statistics.median(seconds) - sum(phases.values())
    print(
        "coordinator phases, median s: "
        + " ".join(f"{name.replace('_', ' ')} {value:.3f}" for name, value in phases.items())
        + f"; the rest (invitations, {args.sites} uploads checked and stored): {rest:.2f} "
        f"= {1000 * rest / args.sites:.1f} ms per site"
    )
    print(f"this process (all sites) peak RSS: {own_peak_rss_mb():.0f} MB")
    print(
        f"RESULT sites={args.sites} round_seconds={statistics.median(seconds):.2f} "
        f"coordinator_peak_rss_mb={rss_mb:.0f} failed_sites={len(failed)}"
    )
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
