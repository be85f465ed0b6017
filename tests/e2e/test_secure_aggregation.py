"""Secure aggregation on the wire: three real sites, a real coordinator, TLS on loopback.

Each site imports real DICOM files, trains, protects and masks its update (Bonawitz et al.,
CCS 2017) and takes part in the key, share and unmask phases over its websocket. The tests
check what matters: each round's new global model is the old one plus the mean of the sites'
protected updates (recomputed from the updates each site kept), within quantisation error;
a site killed after sharing its keys is recovered and the round completes with the
survivors' mean; a replayed and a forged key advertisement are refused on the wire; and no
unmasked update is in anything a site sent or the coordinator wrote
(blobs, state database), compared against the sites' own update files.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.export import export_run
from coordinator.federation import Federation
from shared.crypto.signing import verify
from shared.governance.contributions import contributions
from shared.plan import demo_plan
from shared.protocol.codec import decode
from shared.provenance.bundle import REPORT, verify_bundle
from shared.synthetic import generate_federation
from shared.tensors import decode_tensors
from site_client.core.config import SiteDir
from site_client.core.participant import LocalData, Participant, PhaseEvent
from site_client.core.secagg_participant import record_path
from tests.e2e.sites import enrolled_sites, serving, start_run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CLIP = 100.0  # max_update_norm: no honest update of this model comes near it


async def _run(
    tmp_path: Path, rounds: int, kill_after_sharing: int | None = None, tamper: bool = False
) -> tuple[Federation, str, list[SiteDir], dict[str, list[bytes]]]:
    """A run of ``rounds`` securely aggregated rounds. ``tamper``: on site-0's connection,
    its own key advertisement is sent a second time (a replay) and site-1's is sent as if
    it were site-0's (a forgery), in round 1."""
    data = generate_federation(
        tmp_path / "data", sites=3, seed=5, images_per_site=16, test_images=0, image_size=64
    )
    fed = Federation.init(tmp_path / "coord", CoordinatorConfig(federation="Secure", port=0))
    frames: dict[str, list[bytes]] = {}
    async with serving(fed):
        sites = await enrolled_sites(fed, data, tmp_path)
        plan = demo_plan(
            rounds=rounds,
            quorum=2,
            min_sites=3,
            input_size=32,
            batch_size=8,
            local_epochs=1,
            secure_aggregation=True,
            weighting="uniform",
            max_update_norm=CLIP,
        )
        run_id, standing = start_run(fed, plan)
        tasks: list[asyncio.Task[Any]] = []
        participants: list[Participant] = []
        tampered: set[int] = set()
        flushes: set[asyncio.Future[None]] = set()

        def inject(frame: bytes) -> None:
            session = participants[0]._session
            assert session is not None
            session.send(decode(frame))
            flushes.add(asyncio.ensure_future(participants[0]._flush()))

        def on_frame(i: int, frame: bytes) -> None:
            if tamper and i in (0, 1) and i not in tampered and b'"secagg_keys"' in frame:
                tampered.add(i)
                asyncio.get_running_loop().call_soon(inject, frame)

        def on_phase(i: int, event: PhaseEvent) -> None:
            if i == kill_after_sharing and event.detail.get("step") == "shares_sent":
                tasks[i].cancel()  # the hospital's machine goes down after sharing its keys

        for i, site_dir in enumerate(sites):
            sent = frames.setdefault(site_dir.root.name, [])
            participant = Participant(
                site_dir,
                LocalData.site_index(),
                exit_when_done=True,
                standing=standing,
                on_phase=lambda e, i=i: on_phase(i, e),
                on_frame_out=lambda f, sent=sent, i=i: (
                    sent.append(f.encode("utf-8") if isinstance(f, str) else bytes(f)),
                    on_frame(i, sent[-1]),
                ),
            )
            participants.append(participant)
            tasks.append(asyncio.create_task(participant.run(max_attempts=3)))
        results = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), timeout=240
        )
        for i, result in enumerate(results):
            if i == kill_after_sharing:
                assert isinstance(result, asyncio.CancelledError)
            else:
                assert not isinstance(result, BaseException) and result.run_id == run_id
    return fed, run_id, sites, frames


def _model(fed: Federation, digest: str) -> dict[str, np.ndarray]:
    return decode_tensors(fed.blobs.get(digest))


def _site_update(site: SiteDir, run_id: str, rnd: int) -> dict[str, np.ndarray]:
    return decode_tensors(record_path(site.outbox, run_id, rnd).read_bytes())


def _check_round(
    fed: Federation, run_id: str, rnd: int, updates: list[dict[str, np.ndarray]]
) -> None:
    row = fed.store.round_row(run_id, rnd)
    assert row is not None and row["status"] == "closed" and row["n_updates"] == len(updates)
    before, after = _model(fed, row["model_in"]), _model(fed, row["model_out"])
    for name in updates[0]:
        mean = np.mean([u[name].astype(np.float64) for u in updates], axis=0)
        step = after[name].astype(np.float64) - before[name].astype(np.float64)
        # quantisation (n / (2 scale), scale ~ 2**31 / (3 x CLIP)) plus float32 rounding
        assert np.max(np.abs(step - mean)) < 1e-5, name


def _unmasked_windows(updates: list[dict[str, np.ndarray]]) -> set[bytes]:
    """64-byte runs of every site's update (float32 as the worker wrote it), from each entry
    large enough to hold one."""
    windows = set()
    for update in updates:
        for array in update.values():
            raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
            for at in range(0, len(raw) - 64, 256):
                windows.add(raw[at : at + 64])
    return windows


def _report_section(bundle: Path, title: str) -> str:
    """The report's section whose heading starts with ``title``, up to the next heading."""
    page = (bundle / REPORT).read_text("utf-8")
    start = page.index(f"<h2>{title}")
    end = page.find("<h2>", start + 4)
    return page[start : end if end > 0 else None]


def _coordinator_files(fed: Federation) -> list[bytes]:
    return [p.read_bytes() for p in sorted(fed.paths.root.rglob("*")) if p.is_file()]


async def test_secure_rounds_equal_the_mean_of_the_sites_updates_and_none_leaks(
    tmp_path: Path,
) -> None:
    fed, run_id, sites, frames = await _run(tmp_path, rounds=2, tamper=True)
    try:
        for rnd in (1, 2):
            updates = [_site_update(s, run_id, rnd) for s in sites]
            assert all(np.any(u[n] != 0) for u in updates for n in u)
            _check_round(fed, run_id, rnd, updates)
        # Provenance: each masked input with its digest and signature, then the aggregate.
        received = fed.store.events("masked_update_received")
        assert len(received) == 6
        for event in received:  # each site's signature on its masked input checks offline
            d = event["detail"]
            site = fed.store.site(d["site_id"])
            assert site is not None
            fields = {
                "run_id": d["secagg_run_id"],
                "round": d["round"],
                "config_digest": d["config_digest"],
                "site": d["site_id"],
                "digest": d["digest"],
            }
            verify(site.public_key, "secagg.masked", fields, d["signature"])
        computed = fed.store.events("secure_aggregate_computed")
        assert [e["detail"]["round"] for e in computed] == [1, 2]
        assert all(len(e["detail"]["inputs"]) == 3 for e in computed)
        # An auditor's offline check of the exported bundle counts every masked update.
        bundle = export_run(fed, run_id, tmp_path / "bundle").out
        checked = verify_bundle(bundle)
        assert checked.updates == 6 and checked.sites == 3
        # The board's report says what each sum was made of, and what was refused.
        section = _report_section(bundle, "Secure aggregation")
        assert section.count('<tr><td class="num">') == 2  # rounds 1 and 2
        assert "<td>none</td>" in section  # nobody dropped
        assert "2 secure-aggregation message(s) were refused" in section
        assert "privacy.secagg.forged, privacy.secagg.replayed" in section
        # The contribution ledger credits each site (releases go to the sites that took part).
        ledger = contributions(fed.store.ledger.log().entries, run_id)
        assert [c.rounds_contributed for c in ledger] == [{1, 2}] * 3
        assert all(c.samples > 0 for c in ledger)
        assert fed.store.events("update_received") == []  # no plain update was ever taken
        # The replayed and the forged key advertisement were refused on the wire, not used.
        rejected = {e["detail"]["code"] for e in fed.store.events("secagg_message_rejected")}
        assert rejected == {"privacy.secagg.replayed", "privacy.secagg.forged"}
        # Nothing the sites sent, nothing the coordinator wrote, holds an unmasked update.
        windows = _unmasked_windows([_site_update(s, run_id, r) for s in sites for r in (1, 2)])
        assert len(windows) > 100
        sent = [f for site_frames in frames.values() for f in site_frames]
        assert sum(len(f) for f in sent) > 6 * 10_000  # the masked updates did go out
        for blob in sent + _coordinator_files(fed):
            assert not any(w in blob for w in windows)
    finally:
        fed.close()
    # ... and the check does find an update where there is one: the site's own file.
    assert any(w in record_path(sites[0].outbox, run_id, 1).read_bytes() for w in windows)


async def test_a_site_killed_after_sharing_its_keys_is_recovered_from_the_survivors(
    tmp_path: Path,
) -> None:
    fed, run_id, sites, _ = await _run(tmp_path, rounds=1, kill_after_sharing=1)
    try:
        (computed,) = fed.store.events("secure_aggregate_computed")
        victim = sites[1]
        assert not record_path(victim.outbox, run_id, 1).exists()  # it never masked
        assert len(computed["detail"]["survivors"]) == 2 and len(computed["detail"]["dropped"]) == 1
        survivors = [_site_update(s, run_id, 1) for s in (sites[0], sites[2])]
        _check_round(fed, run_id, 1, survivors)
        # The report names the site recovered from the others' shares.
        section = _report_section(export_run(fed, run_id, tmp_path / "bundle").out, "Secure")
        (row,) = re.findall(r"<tr><td class=\"num\">1</td>.*?</tr>", section)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        victim_name = fed.store.site(computed["detail"]["dropped"][0]).name
        assert cells[1] == "2" and cells[3] == victim_name
    finally:
        fed.close()
