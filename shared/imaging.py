"""The one DICOM-to-tensor path shared by sites, the demo's baselines and the benchmarks.

Theory of operation: a file becomes a model input in four fixed steps, so every party that
trains or evaluates sees the same numbers for the same file:

1. the stored pixels of one frame, decoded (any transfer syntax pydicom and the pylibjpeg
   plugins read) and through the Modality LUT (RescaleSlope/Intercept, PS3.3 C.11.1);
2. MONOCHROME1 images inverted, so that bright means dense everywhere (PS3.3 C.7.6.3.1.2);
3. area-averaged resize to ``input_size`` x ``input_size`` (deterministic on CPU);
4. per-image z-score (zero mean, unit variance), or, when a window is asked for, the VOI
   window to [0, 1] before step 3 instead.

Steps 1 and 2 live in :mod:`shared.dicom_pixels`, which turns every bad file into a
:class:`DataError` with a stable code.

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

from shared.dicom_pixels import Window, apply_window, decode_frames
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


def pixels_to_input(
    ds: pydicom.Dataset, input_size: int, *, frame: int = 0, window: Window = None
) -> np.ndarray:
    """The model input ``(1, S, S)`` float32 of one frame of a greyscale image.

    ``frame`` picks the frame of a multi-frame object (0-based). Without ``window`` the frame
    is z-scored after the resize (steps 1-4 above). With ``window`` (``"file"`` for the file's
    first VOI LUT or window, or an explicit ``(center, width)`` in modality units) it is
    windowed to [0, 1] before the resize and not z-scored, so a fixed window keeps its
    absolute meaning (a CT lung window looks the same at every site).

    Raises only :class:`DataError`: the codes of :func:`shared.dicom_pixels.decode_frames`,
    ``data.frame``, ``data.window`` or ``data.input_size``.
    """
    if input_size < 1:
        raise DataError("Use an input size of at least 1 pixel.", code="data.input_size")
    arr = decode_frames(ds, index=frame)
    if window is not None:
        arr = apply_window(arr, ds, window=window, index=frame)
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))[None]
    t = F.interpolate(t, size=(input_size, input_size), mode="area")
    out = t[0].numpy()
    if window is None:
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

    Files that are not readable DICOM, not greyscale, without a row in the CSV,
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
        except DataError as exc:  # decode_frames raises nothing else for a bad file
            rejected.append(Rejected(path, exc.message))
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
