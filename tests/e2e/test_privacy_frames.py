"""What leaves a site during a run: never pixel data, never a patient identifier.

Two real sites import real DICOM files into their indexes, load labels, share their data
summary, train two rounds against a real coordinator over TLS on loopback and validate each
round. Every frame each site sends is recorded as sent (the participant's ``on_frame_out``
audit hook, before TLS). The test then proves that no frame holds any run of 64 bytes of any
source image's pixel data, nor any source file's PatientID, PatientName, AccessionNumber or
study, series and instance UIDs. The detector is shown to fire on a frame that does leak.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pydicom
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.federation import Federation
from shared.plan import demo_plan
from shared.synthetic import generate_federation
from site_client.core.participant import LocalData, Participant
from tests.e2e.sites import enrolled_sites, serving, start_run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

WINDOW = 64
IDENTIFIERS = (
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)


def _pixel_windows(files: list[Path]) -> set[bytes]:
    """Every 64-byte run of every image's pixel data, except near-constant runs (a stretch
    of black background is 64 equal bytes, which any zero-filled buffer also holds: it
    identifies no image)."""
    windows: set[bytes] = set()
    for path in files:
        data = pydicom.dcmread(path).PixelData
        for i in range(len(data) - WINDOW + 1):
            w = data[i : i + WINDOW]
            if len(set(w)) >= 8:
                windows.add(w)
    return windows


def _identifiers(files: list[Path]) -> set[bytes]:
    found: set[bytes] = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in IDENTIFIERS:
            value = str(ds.get(keyword, "") or "").strip()
            if len(value) >= 4:  # shorter values (a "1") would match by chance
                found.add(value.encode("utf-8"))
    return found


def _leaks(frames: list[bytes], windows: set[bytes], identifiers: set[bytes]) -> list[str]:
    out = []
    for n, frame in enumerate(frames):
        for ident in identifiers:
            if ident in frame:
                out.append(f"frame {n}: identifier {ident!r}")
        for i in range(len(frame) - WINDOW + 1):
            if frame[i : i + WINDOW] in windows:
                out.append(f"frame {n}: pixel data at offset {i}")
                break
    return out


async def test_no_pixel_data_and_no_patient_identifier_ever_leaves_a_site(tmp_path: Path) -> None:
    data = generate_federation(
        tmp_path / "data", sites=2, seed=4, images_per_site=16, test_images=0, image_size=64
    )
    fed = Federation.init(tmp_path / "coord", CoordinatorConfig(federation="Privacy", port=0))
    frames: dict[str, list[bytes]] = {}
    try:
        async with serving(fed):
            sites = await enrolled_sites(fed, data, tmp_path)
            plan = demo_plan(
                rounds=2, quorum=2, min_sites=2, input_size=32, batch_size=8, local_epochs=1
            )
            run_id, standing = start_run(fed, plan)
            participants = []
            for site_dir in sites:
                sent = frames.setdefault(site_dir.root.name, [])
                participants.append(
                    Participant(
                        site_dir,
                        LocalData.site_index(),
                        exit_when_done=True,
                        share_summary=True,
                        standing=standing,
                        on_frame_out=lambda f, sent=sent: sent.append(
                            f.encode("utf-8") if isinstance(f, str) else bytes(f)
                        ),
                    )
                )
            results = await asyncio.wait_for(
                asyncio.gather(*(p.run(max_attempts=3) for p in participants)), timeout=240
            )
            assert all(r is not None and r.run_id == run_id for r in results)
    finally:
        fed.close()

    # The sites did send what a run needs: updates, validations and the data summary.
    every = [f for site_frames in frames.values() for f in site_frames]
    assert len(frames) == 2 and all(len(f) > 10 for f in frames.values())
    assert sum(len(f) for f in every) > 4 * 100_000  # four model updates, at least
    assert any(b"validation_report" in f for f in every)
    assert any(b"site_summary" in f or b"summary" in f for f in every)

    files = [p for site in data.sites for p in sorted(site.dicom_dir.rglob("*.dcm"))]
    windows, identifiers = _pixel_windows(files), _identifiers(files)
    assert len(windows) > 10_000 and len(identifiers) >= 3 * len(files)
    assert _leaks(every, windows, identifiers) == []

    # ... and the detector does fire on a frame that leaks either.
    leaked = pydicom.dcmread(files[0])
    probe = b"x" * 10 + bytes(leaked.PixelData[4000:4100]) + str(leaked.PatientID).encode()
    found = _leaks([probe], windows, identifiers)
    assert any("pixel data" in f for f in found) and any("identifier" in f for f in found)
