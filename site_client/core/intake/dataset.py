"""The local dataset for a plan: labelled images from the index, split by patient, cached.

Theory of operation, in three steps:

1. **Select.** Every indexed instance whose study has a 0/1 label in ``label_column`` (see
   :mod:`.labels`) is one sample: all labelled images are used, not one per study, because a
   study's views are real extra data and never cross the split (the split is by patient). A
   multi-frame object contributes its middle frame (``frames // 2``): one representative image,
   so a 300-frame cine does not outweigh a radiograph 300 to 1.
2. **Split by patient, stratified** (:func:`split_patients`). A patient is positive if any of
   their labelled images is. Within the positive and the negative patients separately,
   patients are ranked by SHA-256 of ``(seed, patient pseudonym)`` and the first
   ``round(holdout_fraction * n)`` go to the hold-out: at least one and at most ``n - 1`` when
   the class has two patients or more, none when it has one. So both classes are on both
   sides whenever possible, no patient is on both sides, and the same index, seed and
   fraction always give the same split, whatever the order of the rows.
3. **Cache.** Each image goes through :func:`shared.imaging.pixels_to_input` once per
   preprocessing spec into ``cache_dir/<spec_hash>/<content_key>.npy``. ``spec_hash`` covers
   the input size, the plan's preprocessing settings, :data:`PIPELINE_VERSION` and the bytes of
   the imaging code, so a change to any of them starts a new directory instead of mixing
   inputs; ``content_key`` is a keyed pseudonym of (SOP Instance UID, file size, mtime_ns) as
   found on disk, so a changed file is one cache miss and the names say nothing about anyone.
   An image that cannot be used leaves a ``<content_key>.err`` with the reason, so it is
   reported on every build but decoded only once. The split's images are then copied once into
   one float32 ``.npy`` per side (``splits/``), named by the hash of their entries, and opened
   as read-only memory maps: an epoch reads them through the page cache, one batch at a time,
   and nothing is held twice in memory. A warm build only stats the files and opens two maps.

Entries whose key no instance of the index has any more (files changed or removed) are deleted
at the end of a build; other spec directories are left to the plans that use them.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

import shared.imaging
from shared.dicom_pixels import Window
from shared.errors import DataError, TrainingCancelled
from shared.splits import split_patients
from site_client.core.intake.index import InstanceRecord, SiteIndex
from site_client.core.intake.labels import binary_value, study_key, study_labels

__all__ = [
    "PIPELINE_VERSION",
    "CachedDataset",
    "SkippedImage",
    "build_dataset",
    "spec_hash",
    "split_patients",
]

#: Bump when what goes into a cache entry changes in a way the imaging code's bytes do not show.
PIPELINE_VERSION = 1

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class SkippedImage:
    """A labelled image left out, and why (pseudonymous keys only)."""

    study: str  # labels.study_key()
    image: str  # first 12 hex digits of the cache content key
    code: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CachedDataset:
    """Train and hold-out arrays, ``(N, 1, S, S)`` float32 images (read-only memory maps) and
    ``(N,)`` float32 0/1 labels, with what the build reused and what it had to compute."""

    train_images: np.ndarray
    train_labels: np.ndarray
    holdout_images: np.ndarray
    holdout_labels: np.ndarray
    train_patient_keys: tuple[str, ...]  # the index's patient pseudonym of each train image
    holdout_patient_keys: tuple[str, ...]
    spec_hash: str
    spec_dir: Path
    hits: int  # entries found in the cache (images or remembered failures)
    misses: int  # entries computed by this build
    skipped: tuple[SkippedImage, ...] = field(default=())

    @property
    def n_train(self) -> int:
        return int(self.train_labels.shape[0])

    @property
    def n_holdout(self) -> int:
        return int(self.holdout_labels.shape[0])

    @property
    def train_patients(self) -> int:
        return len(set(self.train_patient_keys))

    @property
    def holdout_patients(self) -> int:
        return len(set(self.holdout_patient_keys))

    def summary(self) -> str:
        pos = int(self.train_labels.sum()), int(self.holdout_labels.sum())
        return (
            f"{self.n_train} training images ({self.train_patients} patients, {pos[0]} positive), "
            f"{self.n_holdout} hold-out images ({self.holdout_patients} patients, {pos[1]} "
            f"positive); cache: {self.hits} reused, {self.misses} prepared, "
            f"{len(self.skipped)} images left out"
        )


# --- spec and keys ------------------------------------------------------------------------


def _code_digest() -> str:
    h = hashlib.sha256(f"pipeline:{PIPELINE_VERSION}".encode())
    for module in (shared.imaging,):
        h.update(Path(inspect.getfile(module)).read_bytes())
    extra = Path(inspect.getfile(shared.imaging)).with_name("dicom_pixels.py")
    if extra.is_file():  # the decoder behind pixels_to_input, when present
        h.update(extra.read_bytes())
    return h.hexdigest()


def spec_hash(input_size: int, preprocessing: Mapping[str, Any] | None) -> str:
    """The cache directory name for one preprocessing spec (and this version of the code)."""
    spec = {
        "input_size": int(input_size),
        "preprocessing": dict(sorted((preprocessing or {}).items())),
        "code": _code_digest(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _content_key(index: SiteIndex, sop_uid: str, size: int, mtime_ns: int) -> str:
    return index.pseudonym(f"{sop_uid}\x00{size}\x00{mtime_ns}", "tensor")


# --- split --------------------------------------------------------------------------------


# --- build --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Sample:
    record: InstanceRecord
    label: float
    key: str  # content key


def _prepare(sample: _Sample, input_size: int, preprocessing: Mapping[str, Any]) -> np.ndarray:
    """One image to its model input; raises DataError for anything that makes it unusable."""
    rec = sample.record
    try:
        ds = pydicom.dcmread(rec.path, force=True)  # as the importer accepts it
    except FileNotFoundError as exc:
        raise DataError(
            "The file is no longer where it was imported from; run the import again.",
            code="data.missing",
        ) from exc
    except Exception as exc:  # unreadable since import: a data problem, reported
        raise DataError(
            f"The file cannot be read any more ({type(exc).__name__}); run the import again.",
            code="data.unreadable",
        ) from exc
    if str(ds.get("SOPInstanceUID", "")) != rec.sop_uid:
        raise DataError(
            "The file was replaced by another image since it was imported; run the import again.",
            code="data.changed",
        )
    frames = max(1, int(rec.frames or 1))
    return shared.imaging.pixels_to_input(
        ds, input_size, frame=frames // 2, window=_window(preprocessing)
    )


def _window(preprocessing: Mapping[str, Any]) -> Window:
    """The plan's window, if any: ``window: "file"``, or ``window_center`` + ``window_width``
    (modality units); without one the image is z-scored (``normalise: "zscore"``)."""
    if preprocessing.get("window") == "file":
        return "file"
    center, width = preprocessing.get("window_center"), preprocessing.get("window_width")
    if center is None and width is None:
        return None
    try:
        return (float(center), float(width))  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"The plan's window ({center!r}, {width!r}) is not a pair of numbers.",
            code="data.window",
        ) from exc


def _write_atomic_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    os.replace(tmp, path)


def _entry_size(shape: tuple[int, ...]) -> int:
    """Bytes of a complete ``.npy`` entry of ``shape``: one stat tells a whole entry apart
    from a damaged one without reading it (entries are written atomically, so this is a
    guard against outside damage, not against our own crashes)."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype=np.float32), allow_pickle=False)
    return buf.tell()


def _is_entry(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _collect(index: SiteIndex, label_column: str) -> list[tuple[InstanceRecord, float]]:
    labels = study_labels(index, label_column)
    out = []
    for rec in index.instances():
        value = labels.get(rec.study_uid)
        parsed = binary_value(value) if value is not None else None
        if parsed is not None:
            out.append((rec, parsed))
    return out


def _assemble(
    spec_dir: Path,
    name: str,
    entries: list[Path],
    shape: tuple[int, int, int],
) -> np.ndarray:
    """One read-only float32 memory map of ``entries`` stacked; reused when already built."""
    if not entries:
        return np.empty((0, *shape), dtype=np.float32)
    splits = spec_dir / "splits"
    splits.mkdir(parents=True, exist_ok=True)
    path = splits / f"{name}.npy"
    if path.is_file():
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.shape == (len(entries), *shape) and arr.dtype == np.float32:
                return arr
        except (OSError, ValueError):
            pass
    tmp = splits / f".{name}.{os.getpid()}.tmp"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(entries), *shape))
    for i, entry in enumerate(entries):
        out[i] = np.load(entry, allow_pickle=False)
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def build_dataset(
    index: SiteIndex,
    cache_dir: Path,
    *,
    input_size: int,
    label_column: str = "label",
    holdout_fraction: float = 0.2,
    seed: int = 0,
    preprocessing: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CachedDataset:
    """The labelled images of ``index`` for a plan, split by patient, from the tensor cache.

    Only cache entries that are missing are computed. ``progress(done, total)`` is called
    after each image; ``should_stop()`` is polled before each and, when true, raises
    :class:`TrainingCancelled` (entries already prepared are kept for the next build). An
    image that cannot be used is skipped and listed in ``skipped``; only a dataset with no
    usable labelled image raises :class:`DataError` (``data.empty``).
    """
    if input_size < 1:
        raise DataError("Use an input size of at least 1 pixel.", code="data.input_size")
    preprocessing = dict(preprocessing or {})
    _window(preprocessing)  # a bad window is the plan's fault: say so once, not per image
    cache_dir = Path(cache_dir)
    spec = spec_hash(input_size, preprocessing)
    spec_dir = cache_dir / spec
    spec_dir.mkdir(parents=True, exist_ok=True)
    shape = (1, input_size, input_size)
    entry_size = _entry_size(shape)

    labelled = _collect(index, label_column)
    if not labelled:
        raise DataError(
            f"No imported image has a '{label_column}' label yet: import the images and "
            "attach a labels file ('tessera-site import DIR --labels CSV').",
            code="data.empty",
        )

    samples: list[_Sample] = []
    skipped: list[SkippedImage] = []
    used: set[str] = set()
    hits = misses = 0
    for done, (rec, label) in enumerate(labelled):
        if should_stop is not None and should_stop():
            raise TrainingCancelled(
                f"Preparing the images was cancelled after {done} of {len(labelled)}; "
                "what was prepared is kept.",
                code="training.cancelled",
            )
        try:
            st = os.stat(rec.path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = rec.size, rec.mtime_ns  # reported as missing by _prepare
        sample = _Sample(rec, label, _content_key(index, rec.sop_uid, size, mtime))
        used.add(sample.key)
        entry, failure = spec_dir / f"{sample.key}.npy", spec_dir / f"{sample.key}.err"
        if _is_entry(entry, entry_size):
            hits += 1
            samples.append(sample)
        elif failure.is_file():
            hits += 1
            why = json.loads(failure.read_text("utf-8"))
            skipped.append(_skip(index, sample, why["code"], why["reason"]))
        else:
            misses += 1
            try:
                image = _prepare(sample, input_size, preprocessing)
                if image.shape != shape or image.dtype != np.float32:
                    raise DataError(
                        f"The image became {image.shape} {image.dtype}, not {shape} float32.",
                        code="data.shape",
                    )
            except DataError as exc:
                skipped.append(_skip(index, sample, exc.code, exc.message))
                if exc.code not in ("data.missing", "data.unreadable", "data.changed"):
                    failure.write_text(
                        json.dumps({"code": exc.code, "reason": exc.message}), "utf-8"
                    )
            except Exception as exc:  # undecodable pixels the imaging code did not classify
                reason = f"The pixel data cannot be decoded ({type(exc).__name__})."
                skipped.append(_skip(index, sample, "data.corrupt_pixels", reason))
                failure.write_text(
                    json.dumps({"code": "data.corrupt_pixels", "reason": reason}), "utf-8"
                )
            else:
                _write_atomic_npy(entry, image)
                samples.append(sample)
        if progress is not None:
            progress(done + 1, len(labelled))

    if not samples:
        raise DataError(
            f"None of the {len(labelled)} labelled images can be used "
            f"({len(skipped)} left out; the first because: {skipped[0].reason})",
            code="data.empty",
        )

    patient_labels: dict[str, float] = {}
    for s in samples:
        p = s.record.patient_key
        patient_labels[p] = max(patient_labels.get(p, 0.0), s.label)
    held = split_patients(patient_labels, holdout_fraction, seed)
    samples.sort(key=lambda s: (s.record.patient_key, s.record.study_uid, s.record.sop_uid))
    train = [s for s in samples if s.record.patient_key not in held]
    hold = [s for s in samples if s.record.patient_key in held]

    # One pair of split files per (label column, seed, fraction); the digest names the content.
    tag = hashlib.sha256(f"{label_column}\x00{seed}\x00{holdout_fraction!r}".encode())
    splits: set[str] = set()

    def side(name: str, part: list[_Sample]) -> tuple[np.ndarray, np.ndarray]:
        digest = hashlib.sha256(f"{spec}:{name}".encode())
        for s in part:
            digest.update(s.key.encode())
        stem = f"{name}-{tag.hexdigest()[:8]}-{digest.hexdigest()[:20]}"
        splits.add(stem)
        entries = [spec_dir / f"{s.key}.npy" for s in part]
        images = _assemble(spec_dir, stem, entries, shape)
        return images, np.array([s.label for s in part], dtype=np.float32)

    train_images, train_labels = side("train", train)
    holdout_images, holdout_labels = side("holdout", hold)
    _prune(index, spec_dir, used, splits)
    return CachedDataset(
        train_images=train_images,
        train_labels=train_labels,
        holdout_images=holdout_images,
        holdout_labels=holdout_labels,
        train_patient_keys=tuple(s.record.patient_key for s in train),
        holdout_patient_keys=tuple(s.record.patient_key for s in hold),
        spec_hash=spec,
        spec_dir=spec_dir,
        hits=hits,
        misses=misses,
        skipped=tuple(skipped),
    )


def _prune(index: SiteIndex, spec_dir: Path, used: set[str], splits: set[str]) -> None:
    """Delete entries no indexed instance has any more, and superseded split files."""
    keep = set(used)
    for row in index.db.query("select sop_uid, size, mtime_ns from instances"):
        keep.add(_content_key(index, row["sop_uid"], row["size"], row["mtime_ns"]))
    for path in spec_dir.iterdir():
        if path.suffix in (".npy", ".err") and path.stem not in keep:
            path.unlink(missing_ok=True)
    prefixes = {stem.rsplit("-", 1)[0] for stem in splits}
    split_dir = spec_dir / "splits"
    if split_dir.is_dir():
        for path in split_dir.glob("*.npy"):
            if path.stem.rsplit("-", 1)[0] in prefixes and path.stem not in splits:
                path.unlink(missing_ok=True)


def _skip(index: SiteIndex, sample: _Sample, code: str, reason: str) -> SkippedImage:
    return SkippedImage(study_key(index, sample.record.study_uid), sample.key[:12], code, reason)
