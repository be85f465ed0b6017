"""End to end, homomorphic-encryption mode: three real sites and a real coordinator over TLS.

The sites set up one CKKS key among themselves through the coordinator, upload their local
models encrypted, and decrypt each round's global model, which the coordinator computes by
adding ciphertexts it cannot read. Checked from outside: each round's encrypted aggregate
decrypts (with a site's key) to the sample-weighted mean of the local models the sites
uploaded; the coordinator never received or wrote the key or any plaintext model after the
first (the plan's initial weights); the sites validated every round's model, which they could
only do by decrypting it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.export import export_run
from coordinator.federation import Federation
from coordinator.he_server import KEY_READY
from coordinator.release import make_release
from shared.aggregation import layout_of
from shared.plan import demo_plan
from shared.privacy.he_rounds import decrypt_global, is_encrypted
from shared.privacy.homomorphic import key_id
from shared.synthetic import generate_federation
from shared.tensors import decode_tensors, encode_tensors
from site_client.core.config import SiteDir
from site_client.core.he_participant import key_path
from site_client.core.participant import LocalData, Participant, PhaseEvent
from tests.e2e.sites import enrolled_sites, serving, start_run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ROUNDS = 2


async def _run(
    tmp_path: Path, *, quorum: int = 3, late: int | None = None, seen: list[Any] | None = None
) -> tuple[Federation, str, list[SiteDir], list[bytes]]:
    """A run of ``ROUNDS`` encrypted rounds by three sites. ``late``: that site connects
    only once round 1 has begun (the others are training), so after the key was set up;
    ``seen`` gets its phases, with the time of each."""
    data = generate_federation(
        tmp_path / "data", sites=3, seed=7, images_per_site=12, test_images=0, image_size=32
    )
    fed = Federation.init(tmp_path / "coord", CoordinatorConfig(federation="Encrypted", port=0))
    frames: list[bytes] = []
    async with serving(fed):
        sites = await enrolled_sites(fed, data, tmp_path)
        plan = demo_plan(
            rounds=ROUNDS,
            quorum=quorum,
            min_sites=quorum,
            architecture="mlp",
            architecture_params={"width": 6},  # 6,157 parameters: two ciphertexts of 4096
            input_size=32,
            batch_size=8,
            local_epochs=1,
            homomorphic=True,
        )
        run_id, standing = start_run(fed, plan)
        tasks: dict[int, asyncio.Task[Any]] = {}

        def on_phase(i: int, event: PhaseEvent) -> None:
            if i == late and seen is not None:
                seen.append((time.time(), event.phase))
            if late is not None and late not in tasks and event.phase == "training":
                tasks[late] = asyncio.ensure_future(participants[late].run(max_attempts=3))

        participants = [
            Participant(
                site_dir,
                LocalData.site_index(),
                exit_when_done=True,
                standing=standing,
                on_phase=lambda e, i=i: on_phase(i, e),
                on_frame_out=lambda f: frames.append(
                    f.encode("utf-8") if isinstance(f, str) else bytes(f)
                ),
            )
            for i, site_dir in enumerate(sites)
        ]
        for i, participant in enumerate(participants):
            if i != late:
                tasks[i] = asyncio.ensure_future(participant.run(max_attempts=3))
        first = list(tasks.values())
        results = await asyncio.wait_for(asyncio.gather(*first), timeout=240)
        if late is not None:
            results.append(await asyncio.wait_for(tasks[late], timeout=60))
        assert all(r is not None and r.run_id == run_id for r in results)
    return fed, run_id, sites, frames


def _windows(arrays: dict[str, np.ndarray]) -> set[bytes]:
    """64-byte runs of a model's float32 bytes, from each entry large enough to hold one."""
    out = set()
    for array in arrays.values():
        raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
        out.update(raw[at : at + 64] for at in range(0, len(raw) - 64, 128))
    return out


async def test_encrypted_rounds_average_the_local_models_without_the_coordinator_reading_them(
    tmp_path: Path,
) -> None:
    fed, run_id, sites, frames = await _run(tmp_path)
    try:
        # One key, held by every site and by the coordinator only as its id and parameters.
        secrets = [key_path(s.root, run_id).read_bytes() for s in sites]
        assert secrets[0] == secrets[1] == secrets[2]
        (ready,) = [e["detail"] for e in fed.store.events(KEY_READY)]
        assert ready["run_id"] == run_id and ready["key_id"] == key_id(secrets[0])
        assert sorted(ready["sites"]) == sorted(s.load().site_id for s in sites)
        secret = secrets[0]

        first = fed.store.round_row(run_id, 1)
        assert first is not None
        layout = layout_of(decode_tensors(fed.blobs.get(first["model_in"])))
        plaintexts: list[dict[str, np.ndarray]] = []
        for rnd in range(1, ROUNDS + 1):
            row = fed.store.round_row(run_id, rnd)
            assert row is not None and row["status"] == "closed" and row["n_updates"] == 3
            aggregate = fed.blobs.get(row["model_out"])
            assert is_encrypted(aggregate)  # the coordinator holds the new model encrypted
            updates = fed.store.updates(run_id, rnd)
            locals_ = {
                u.site_id: decrypt_global(secret, fed.blobs.get(u.digest), layout) for u in updates
            }
            total = sum(u.num_samples for u in updates)
            got = decrypt_global(secret, aggregate, layout)
            for name in layout:
                mean = sum(
                    u.num_samples / total * locals_[u.site_id][name].astype(np.float64)
                    for u in updates
                )
                assert np.max(np.abs(got[name] - mean)) < 1e-4, (rnd, name)
            if rnd > 1:  # each site trained from the decrypted global model: its upload moved
                before = decrypt_global(secret, fed.blobs.get(row["model_in"]), layout)
                assert all(
                    not np.allclose(locals_[s][n], before[n]) for s in locals_ for n in layout
                )
            plaintexts += [got, *locals_.values()]

        # The sites validated every round's model (they could only by decrypting it).
        validated = {
            (e["detail"]["site_id"], e["detail"]["round"])
            for e in fed.store.events("validation_reported")
            if e["detail"]["run_id"] == run_id
        }
        assert len(validated) == 3 * ROUNDS

        # The coordinator cannot hand out weights it cannot read, and says so.
        with pytest.raises(ConfigError) as refused:
            make_release(fed, run_id, "1.0")
        assert refused.value.code == "release.encrypted"
        with pytest.raises(ConfigError) as refused:
            export_run(fed, run_id, tmp_path / "bundle")
        assert refused.value.code == "export.encrypted"

        # Nothing the sites sent and nothing the coordinator wrote holds the key or any of
        # those plaintext models.
        windows = set().union(*(_windows(m) for m in plaintexts))
        assert len(windows) > 300
        stored = [p.read_bytes() for p in sorted(fed.paths.root.rglob("*")) if p.is_file()]
        probe = secret[len(secret) // 2 : len(secret) // 2 + 64]
        for blob in frames + stored:
            assert probe not in blob
            assert not any(w in blob for w in windows)
    finally:
        fed.close()
    # ... and the check does find a model where there is one: in its safetensors bytes.
    assert any(w in encode_tensors(plaintexts[0]) for w in windows)


async def test_a_site_that_joins_after_the_key_was_set_up_is_not_invited(tmp_path: Path) -> None:
    seen: list[Any] = []
    fed, run_id, sites, _ = await _run(tmp_path, quorum=2, late=2, seen=seen)
    try:
        late = sites[2].load().site_id
        # It was there during the run, was invited to nothing, and trained nothing.
        connected = [at for at, phase in seen if phase == "connected"]
        last = fed.store.round_row(run_id, ROUNDS)
        assert last is not None and connected and connected[0] < last["closed_at"]
        assert not {"downloading", "training", "uploading"} & {phase for _, phase in seen}
        (ready,) = [e["detail"] for e in fed.store.events(KEY_READY)]
        assert late not in ready["sites"] and len(ready["sites"]) == 2
        assert not key_path(sites[2].root, run_id).exists()  # it never got the key
        for rnd in range(1, ROUNDS + 1):
            row = fed.store.round_row(run_id, rnd)
            assert row is not None and row["status"] == "closed" and row["n_updates"] == 2
            assert late not in {u.site_id for u in fed.store.updates(run_id, rnd)}
    finally:
        fed.close()
