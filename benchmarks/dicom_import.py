"""Folder import speed against a bare header-reading loop over the same files, same run.

Run: ``python -m benchmarks.dicom_import``. Writes ``FILES`` small synthetic DICOM files
(64 x 64 DX images with a realistic header: patient, study, series, equipment; writing them is
not timed) in a patient/study folder tree, then measures:

- ``bare``: ``pydicom.dcmread(path, stop_before_pixels=True)`` over the same files in the same
  (sorted) order, nothing else: the floor for any importer that reads headers with pydicom.
  Run once to warm the file cache, then best of ``RUNS``.
- ``first``: ``import_folder`` into a fresh index (walk, stat, read, pseudonymise, write in
  batches, commit): best of ``RUNS``, each into its own new index.
- ``reimport``: ``import_folder`` again over the unchanged folder (walk and stat only; no
  file is opened): best of ``RUNS``.

The three run in interleaved rounds, so that load from elsewhere on the machine does not
favour one of them.

Bars: ``overhead_ratio = first / bare <= 1.3``; ``reimport_ratio = reimport / first <= 0.05``.
The last line is ``RESULT files=... overhead_ratio=... reimport_ratio=... files_per_s=...``
(``files_per_s``: files per second of the first import).
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from site_client.core.intake.importer import import_folder
from site_client.core.intake.index import SiteIndex

FILES = 5000
IMAGES_PER_STUDY = 5
RUNS = 3
SIZE = 64


def write_files(root: Path, n: int) -> list[str]:
    """``n`` synthetic DX images, ``IMAGES_PER_STUDY`` per study, one study per patient."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, size=(SIZE, SIZE), dtype="<u2").tobytes()
    paths = []
    study_uid = series_uid = ""
    for i in range(n):
        patient = i // IMAGES_PER_STUDY
        if i % IMAGES_PER_STUDY == 0:
            study_uid, series_uid = generate_uid(), generate_uid()
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240115"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
        ds.AccessionNumber = f"ACC{patient:07d}"
        ds.Modality = "DX"
        ds.Manufacturer = "Synthetica Medical"
        ds.InstitutionName = "Synthetic Hospital"
        ds.InstitutionAddress = "1 Example Street"
        ds.ReferringPhysicianName = "SYN^REFERRER"
        ds.StudyDescription = "CHEST PA (SYNTHETIC)"
        ds.ManufacturerModelName = "LumaDR 500"
        ds.PatientName = f"SYN^PATIENT{patient:05d}"
        ds.PatientID = f"SYN-{patient:06d}"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = "PA"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i % IMAGES_PER_STUDY + 1
        ds.ImagerPixelSpacing = [0.3, 0.3]
        ds.PixelSpacing = [0.3, 0.3]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = SIZE
        ds.Columns = SIZE
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = "2047"
        ds.WindowWidth = "4095"
        ds.PixelData = pixels
        folder = root / f"P{patient:05d}" / "study01"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"IM{i % IMAGES_PER_STUDY:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    return sorted(paths)


def bare_loop(paths: list[str]) -> float:
    start = time.perf_counter()
    for p in paths:
        pydicom.dcmread(p, stop_before_pixels=True)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        base = Path(tmp)
        root = base / "dicom"
        t = time.perf_counter()
        paths = write_files(root, FILES)
        print(f"wrote {len(paths)} files in {time.perf_counter() - t:.1f} s (not timed)")

        bare_loop(paths)  # warm the file cache and pydicom's own caches
        # Interleaved rounds (bare, first import, re-import), best of each: a busy machine
        # slows whichever measurement it happens to overlap, not always the same one.
        bares, firsts, reimports = [], [], []
        for run in range(RUNS):
            bares.append(bare_loop(paths))
            index = SiteIndex(base / f"index-{run}.db", secrets.token_bytes(32))
            start = time.perf_counter()
            report = import_folder(index, root)
            firsts.append(time.perf_counter() - start)
            if report.indexed != FILES or report.rejected:
                sys.exit(f"first import indexed {report.indexed}, rejected {report.rejected}")
            start = time.perf_counter()
            report = import_folder(index, root)
            reimports.append(time.perf_counter() - start)
            if report.unchanged != FILES:
                sys.exit(f"re-import found {report.unchanged} of {FILES} files unchanged")
            if index.check_consistency():
                sys.exit(f"index inconsistent: {index.check_consistency()}")
            index.close()
        bare = min(bares)
        print(
            f"bare dcmread(stop_before_pixels=True) loop: {bare:.3f} s "
            f"(runs: {', '.join(f'{x:.3f}' for x in bares)})"
        )
        first, reimport = min(firsts), min(reimports)
        print(f"first import_folder: {first:.3f} s (runs: {', '.join(f'{x:.3f}' for x in firsts)})")
        print(
            f"re-import, unchanged: {reimport:.3f} s "
            f"(runs: {', '.join(f'{x:.3f}' for x in reimports)})"
        )
        overhead = first / bare
        ratio = reimport / first
        print(f"cpu count {os.cpu_count()}; pydicom {pydicom.__version__}")
        print(
            f"RESULT files={FILES} overhead_ratio={overhead:.3f} reimport_ratio={ratio:.3f} "
            f"files_per_s={FILES / first:.0f}"
        )


if __name__ == "__main__":
    main()
