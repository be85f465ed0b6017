"""The one DICOM-to-tensor path shared by sites, the demo's baselines and the benchmarks.

Theory of operation: a file becomes a model input in four fixed steps, so every party that
trains or evaluates sees the same numbers for the same file:

1. the stored pixels, through the Modality LUT (RescaleSlope/Intercept, PS3.3 C.11.1);
2. MONOCHROME1 images negated, so that bright means dense everywhere (PS3.3 C.7.6.3.1.2);
3. area-averaged resize to ``input_size`` x ``input_size`` (deterministic on CPU);
4. per-image z-score (zero mean, unit variance).

Labels live in a CSV beside the images, matched by StudyInstanceUID (or SOPInstanceUID when
that column is present). Bad input is a data-quality problem, not a crash: a file that cannot
be read or has no usable label is skipped and reported as :class:`Rejected`; only a CSV
without the needed columns, or a folder with nothing usable, raises :class:`DataError`.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.pixels import apply_modality_lut

from shared.errors import DataError


@dataclass(frozen=True, slots=True)
class Rejected:
    """A file that was skipped, and why (plain language, no patient data)."""

    path: Path
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelledImages:
    images: np.ndarray  # (N, 1, S, S) float32
    labels: np.ndarray  # (N,) float32, 0.0 or 1.0
    patient_ids: tuple[str, ...]
    study_uids: tuple[str, ...]
    sop_uids: tuple[str, ...]
    paths: tuple[Path, ...]
    rejected: tuple[Rejected, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def pixels_to_input(ds: pydicom.Dataset, input_size: int) -> np.ndarray:
    """The model input ``(1, S, S)`` float32 of one single-frame greyscale image."""
    if input_size < 1:
        raise DataError("Use an input size of at least 1 pixel.", code="data.input_size")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(
            f"Only greyscale images can be used; this one is {photometric or 'unspecified'}.",
            code="data.unsupported",
        )
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DataError("Only single-frame images can be used.", code="data.unsupported")
    arr = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
    if arr.ndim != 2:
        raise DataError("Only single-frame 2-D images can be used.", code="data.unsupported")
    if photometric == "MONOCHROME1":
        arr = -arr  # the z-score below removes the offset, so negation is a full inversion
    t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    t = F.interpolate(t, size=(input_size, input_size), mode="area")
    out = t[0].numpy()
    std = float(out.std())
    out = (out - out.mean()) / std if std > 1e-12 else np.zeros_like(out)
    return out.astype(np.float32)


def _read_labels(labels_csv: Path, label_column: str) -> tuple[str, dict[str, str]]:
    try:
        with Path(labels_csv).open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(
            f"The labels file {Path(labels_csv).name} cannot be read ({type(exc).__name__}); "
            "check that it exists and is a UTF-8 CSV file.",
            code="data.labels",
        ) from exc
    key = "SOPInstanceUID" if "SOPInstanceUID" in columns else "StudyInstanceUID"
    missing = [c for c in (key, label_column) if c not in columns]
    if missing:
        raise DataError(
            f"The labels file {Path(labels_csv).name} lacks the column(s) "
            f"{', '.join(missing)}; it needs a StudyInstanceUID (or SOPInstanceUID) column "
            f"and a '{label_column}' column (found: {', '.join(columns) or 'none'}).",
            code="data.labels",
        )
    labels: dict[str, str] = {}
    conflicting: set[str] = set()
    for row in rows:
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        uid, value = row.get(key, ""), row.get(label_column, "")
        if not uid:
            continue
        if uid in labels and labels[uid] != value:
            conflicting.add(uid)
        labels[uid] = value
    for uid in conflicting:
        labels[uid] = "conflicting"
    return key, labels


def _parse_label(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number in (0.0, 1.0) else None


def load_labelled_folder(
    dicom_dir: Path,
    labels_csv: Path,
    *,
    input_size: int,
    label_column: str = "label",
) -> LabelledImages:
    """Every labelled image under ``dicom_dir`` (recursively), sorted by StudyInstanceUID.

    Files that are not readable DICOM, not single-frame greyscale, without a row in the CSV,
    with a label other than 0/1, or duplicates of an image already loaded, are skipped and
    listed in ``rejected``.
    """
    key, labels = _read_labels(labels_csv, label_column)
    dicom_dir = Path(dicom_dir)
    if not dicom_dir.is_dir():
        raise DataError(
            f"The image folder {dicom_dir.name} does not exist; choose the folder that holds "
            "the DICOM files.",
            code="data.empty",
        )
    rejected: list[Rejected] = []
    records: dict[str, tuple[str, str, str, Path, np.ndarray, float]] = {}
    for path in sorted(p for p in dicom_dir.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
            study_uid = str(ds.StudyInstanceUID)
            sop_uid = str(ds.SOPInstanceUID)
            patient_id = str(ds.get("PatientID", ""))
        except Exception as exc:  # an adapter edge: any unreadable file is reported, not raised
            rejected.append(Rejected(path, f"not a readable DICOM image ({type(exc).__name__})"))
            continue
        uid = sop_uid if key == "SOPInstanceUID" else study_uid
        if uid not in labels:
            rejected.append(Rejected(path, f"no label for this image's {key} in the labels file"))
            continue
        label = _parse_label(labels[uid])
        if label is None:
            rejected.append(
                Rejected(path, f"label {labels[uid]!r} is not 0 or 1 in column '{label_column}'")
            )
            continue
        if uid in records:
            rejected.append(Rejected(path, f"another file with the same {key} was already loaded"))
            continue
        try:
            image = pixels_to_input(ds, input_size)
        except DataError as exc:
            rejected.append(Rejected(path, exc.message))
            continue
        except Exception as exc:  # undecodable pixel data, unsupported compression, ...
            rejected.append(Rejected(path, f"pixel data cannot be decoded ({type(exc).__name__})"))
            continue
        records[uid] = (study_uid, sop_uid, patient_id, path, image, label)

    if not records:
        raise DataError(
            f"No usable labelled images in {dicom_dir.name} ({len(rejected)} file(s) skipped); "
            "check that the labels file matches the images.",
            code="data.empty",
            rejected=len(rejected),
        )
    ordered = sorted(records.values(), key=lambda r: (r[0], r[1]))
    return LabelledImages(
        images=np.stack([r[4] for r in ordered]).astype(np.float32),
        labels=np.array([r[5] for r in ordered], dtype=np.float32),
        patient_ids=tuple(r[2] for r in ordered),
        study_uids=tuple(r[0] for r in ordered),
        sop_uids=tuple(r[1] for r in ordered),
        paths=tuple(r[3] for r in ordered),
        rejected=tuple(rejected),
    )


def patient_split(
    patient_ids: Sequence[str], holdout_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, holdout)``, all images of a patient on the same side.

    Patients are ranked by SHA-256 of ``seed`` and PatientID, and the first
    ``round(holdout_fraction * n_patients)`` go to the hold-out (at least one when the fraction
    is positive and there are two patients or more), so the split is deterministic, does not
    depend on the order of the images.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise DataError("The hold-out fraction must be in [0, 1).", code="data.split")
    unique = sorted(set(patient_ids))
    ranked = sorted(unique, key=lambda p: hashlib.sha256(f"{seed}\x00{p}".encode()).hexdigest())
    n_hold = round(holdout_fraction * len(unique))
    if holdout_fraction > 0 and len(unique) >= 2:
        n_hold = min(max(n_hold, 1), len(unique) - 1)
    held = set(ranked[:n_hold])
    is_held = np.array([p in held for p in patient_ids], dtype=bool)
    idx = np.arange(len(patient_ids), dtype=np.int64)
    return idx[~is_held], idx[is_held]
