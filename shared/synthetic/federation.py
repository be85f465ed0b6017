"""A synthetic federation on disk: per-site DICOM folders and label CSVs, plus a pooled test set.

Theory of operation: each site gets patients, each patient one or more studies (one series,
one chest radiograph per study). Every image is a phantom (:mod:`shared.synthetic.phantom`)
seen through that site's scanner (:mod:`shared.synthetic.scanners`) and written as a real
DICOM Part 10 file (explicit VR little endian) with pydicom. The binary label (nodule present
or absent) goes to the site's ``labels.csv`` keyed by StudyInstanceUID, never into the file.
The held-out test set mixes every site's look in proportion to the site sizes.

Settings: ``"default"`` (the demo's three scanners, mild shift) and ``"hard"`` (four very
different scanners with label skew, :data:`shared.synthetic.scanners.HARD_PROFILES`, for the
heterogeneity and compression benchmarks). The hard test set gives every scanner the same
share, each with half positives: it is there to measure each site's AUC on its own scanner,
and an AUC's precision is set by its rarer class, so balanced shares measure every site equally
well (AUC itself does not depend on the positive rate). It also keeps a model from scoring
well on the whole test set by learning "this scanner's images are mostly positive" from the
skewed training labels.

Determinism: every image draws from its own ``numpy`` generator seeded by (seed, site,
image), and every UID is ``generate_uid(entropy_srcs=...)`` over the same keys, so the same
arguments give byte-identical files, and adding test images or sites does not change the
images already there. No clock, no global RNG, nothing from the host machine.

The data are synthetic: no real patient is behind any file. PatientName/PatientID look like
``SYN^S1P0001`` / ``SYN-S1-0001`` so that nobody mistakes them for real ones.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from shared.errors import DataError
from shared.synthetic.phantom import random_anatomy, random_lesion, render_density
from shared.synthetic.scanners import SETTINGS, ScannerProfile, acquire, profile_for_site

#: Images per site when not given; sites past the third cycle through these.
DEFAULT_IMAGES_PER_SITE: tuple[int, ...] = (220, 240, 160)
DEFAULT_TEST_IMAGES = 300
DEFAULT_IMAGE_SIZE = 128
#: The hard setting's defaults: four sites, a test set with equal, balanced shares per scanner.
HARD_IMAGES_PER_SITE: tuple[int, ...] = (260, 200, 240, 220)
HARD_TEST_IMAGES = 600
HARD_TEST_PREVALENCE = 0.5

_ENTROPY_TAG = "tessera-synthetic-v1"
_BASE_DATE = dt.date(2021, 1, 4)


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteData:
    name: str
    dicom_dir: Path
    labels_csv: Path
    n_images: int
    n_patients: int
    prevalence: float  # share of positive labels actually written
    manufacturer: str
    model: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationManifest:
    root: Path
    seed: int
    image_size: int
    sites: tuple[SiteData, ...]
    test_dicom_dir: Path
    test_labels_csv: Path
    test_images: int
    setting: str = "default"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view; paths are relative to ``root`` so the manifest is relocatable."""

        def rel(p: Path) -> str:
            return p.relative_to(self.root).as_posix()

        extra = {} if self.setting == "default" else {"setting": self.setting}
        return {
            **extra,  # absent for the default setting: its manifests stay byte-identical
            "format": "tessera-synthetic-federation/1",
            "seed": self.seed,
            "image_size": self.image_size,
            "sites": [
                {
                    "name": s.name,
                    "dicom_dir": rel(s.dicom_dir),
                    "labels_csv": rel(s.labels_csv),
                    "n_images": s.n_images,
                    "n_patients": s.n_patients,
                    "prevalence": s.prevalence,
                    "manufacturer": s.manufacturer,
                    "model": s.model,
                }
                for s in self.sites
            ],
            "test": {
                "dicom_dir": rel(self.test_dicom_dir),
                "labels_csv": rel(self.test_labels_csv),
                "n_images": self.test_images,
            },
        }


@dataclass(frozen=True, slots=True)
class _Study:
    patient_no: int
    study_no: int  # 1-based within the patient
    label: int


def generate_federation(
    out_dir: Path,
    *,
    sites: int | None = None,
    seed: int = 0,
    images_per_site: int | Sequence[int] | None = None,
    test_images: int | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    setting: str = "default",
) -> FederationManifest:
    """Write a synthetic federation under ``out_dir`` and return (and write) its manifest.

    Layout: ``site-N/dicom/<PatientID>/<study>.dcm``, ``site-N/labels.csv``, the same under
    ``test/``, and ``manifest.json``. ``images_per_site`` is one number for every site or one
    per site. Defaults: ``"default"`` setting, 3 sites, :data:`DEFAULT_IMAGES_PER_SITE` in turn
    and :data:`DEFAULT_TEST_IMAGES`; ``"hard"``: 4 sites (at most 4),
    :data:`HARD_IMAGES_PER_SITE` and :data:`HARD_TEST_IMAGES`.
    """
    if setting not in SETTINGS:
        raise DataError(
            f"Unknown synthetic setting {setting!r}; choose one of "
            f"{', '.join(map(repr, SETTINGS))}.",
            code="data.synthetic",
        )
    hard = setting == "hard"
    if sites is None:
        sites = len(HARD_IMAGES_PER_SITE) if hard else 3
    if test_images is None:
        test_images = HARD_TEST_IMAGES if hard else DEFAULT_TEST_IMAGES
    if sites < 1:
        raise DataError("Ask for at least one site.", code="data.synthetic")
    if image_size < 32:
        raise DataError("Use an image size of at least 32 pixels.", code="data.synthetic")
    if hard and sites > len(HARD_IMAGES_PER_SITE):
        raise DataError(
            f"The hard setting has {len(HARD_IMAGES_PER_SITE)} scanners; ask for at most "
            f"{len(HARD_IMAGES_PER_SITE)} sites (got {sites}).",
            code="data.synthetic",
        )
    if images_per_site is None:
        defaults = HARD_IMAGES_PER_SITE if hard else DEFAULT_IMAGES_PER_SITE
        sizes = [defaults[i % len(defaults)] for i in range(sites)]
    elif isinstance(images_per_site, int):
        sizes = [images_per_site] * sites
    else:
        sizes = [int(n) for n in images_per_site]
        if len(sizes) != sites:
            raise DataError(
                f"Give one image count per site: got {len(sizes)} counts for {sites} sites.",
                code="data.synthetic",
            )
    if any(n < 1 for n in sizes) or test_images < 0:
        raise DataError("Image counts must be positive.", code="data.synthetic")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profiles = [profile_for_site(i, setting) for i in range(sites)]
    # The key seeds each set's images and UIDs; the hard setting's differ from the default's,
    # so the two can be imported side by side without UID clashes.
    prefix = "" if setting == "default" else f"{setting}/"

    site_data = []
    for i, (profile, n) in enumerate(zip(profiles, sizes, strict=True)):
        name = f"site-{i + 1}"
        studies = _plan_studies(np.random.default_rng([seed, i, 0]), n, [profile.prevalence], [n])
        root = out_dir / name
        _write_set(
            root,
            studies,
            [profile] * n,
            seed=seed,
            set_key=prefix + name,
            tag=f"S{i + 1}",
            image_size=image_size,
            institution=f"Synthetic Hospital {i + 1}",
        )
        site_data.append(
            SiteData(
                name=name,
                dicom_dir=root / "dicom",
                labels_csv=root / "labels.csv",
                n_images=n,
                n_patients=len({s.patient_no for s in studies}),
                prevalence=round(sum(s.label for s in studies) / n, 4),
                manufacturer=profile.manufacturer,
                model=profile.model,
            )
        )

    # Pooled test set: each site's look in proportion to its size (largest remainder), or
    # (hard) in equal, balanced shares (module docstring).
    shares = _apportion(test_images, [1] * sites if hard else sizes)
    test_prevalences = [HARD_TEST_PREVALENCE if hard else p.prevalence for p in profiles]
    test_profiles = [p for p, k in zip(profiles, shares, strict=True) for _ in range(k)]
    test_studies = _plan_studies(
        np.random.default_rng([seed, 10_000, 0]), test_images, test_prevalences, shares
    )
    test_root = out_dir / "test"
    _write_set(
        test_root,
        test_studies,
        test_profiles,
        seed=seed,
        set_key=prefix + "test",
        tag="T",
        image_size=image_size,
        institution="Synthetic Test Archive",
    )

    manifest = FederationManifest(
        root=out_dir,
        seed=seed,
        image_size=image_size,
        sites=tuple(site_data),
        test_dicom_dir=test_root / "dicom",
        test_labels_csv=test_root / "labels.csv",
        test_images=test_images,
        setting=setting,
    )
    (out_dir / "manifest.json").write_text(
        json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return manifest


def _apportion(total: int, weights: Sequence[int]) -> list[int]:
    raw = [total * w / sum(weights) for w in weights]
    base = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda k: (-(raw[k] - base[k]), k))
    for k in order[: total - sum(base)]:
        base[k] += 1
    return base


def _plan_studies(
    rng: np.random.Generator, n: int, prevalences: Sequence[float], blocks: Sequence[int]
) -> list[_Study]:
    """Patients with 1-3 studies each, and labels with exactly round(prevalence * n) positives
    per block (a block is one scanner profile's share of the set, in order)."""
    labels: list[int] = []
    for prev, k in zip(prevalences, blocks, strict=True):
        pos = round(prev * k)
        block = np.array([1] * pos + [0] * (k - pos))
        labels.extend(int(v) for v in rng.permutation(block))
    studies: list[_Study] = []
    patient = 0
    while len(studies) < n:
        patient += 1
        k = int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1]))
        for j in range(min(k, n - len(studies))):
            studies.append(_Study(patient_no=patient, study_no=j + 1, label=labels[len(studies)]))
    return studies


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(entropy_srcs=[_ENTROPY_TAG, str(seed), *(str(p) for p in parts)])


def _write_set(
    root: Path,
    studies: Sequence[_Study],
    profiles: Sequence[ScannerProfile],
    *,
    seed: int,
    set_key: str,
    tag: str,
    image_size: int,
    institution: str,
) -> None:
    dicom_dir = root / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    date_rng = np.random.default_rng([seed, _stable_hash(set_key), 1])
    first_dates: dict[int, dt.date] = {}
    for idx, (study, profile) in enumerate(zip(studies, profiles, strict=True)):
        rng = np.random.default_rng([seed, _stable_hash(set_key), 2, idx])
        anatomy = random_anatomy(
            np.random.default_rng([seed, _stable_hash(set_key), 3, study.patient_no])
        )
        lesion = (
            random_lesion(
                rng,
                anatomy,
                radius_range=profile.lesion_radius,
                contrast_range=profile.lesion_contrast,
            )
            if study.label
            else None
        )
        pixels = acquire(render_density(anatomy, lesion, image_size), profile, rng)

        if study.patient_no not in first_dates:
            first_dates[study.patient_no] = _BASE_DATE + dt.timedelta(
                days=int(date_rng.integers(0, 900))
            )
        date = first_dates[study.patient_no] + dt.timedelta(days=120 * (study.study_no - 1))
        patient_id = f"SYN-{tag}-{study.patient_no:04d}"
        keys = (set_key, study.patient_no, study.study_no)
        ds = _dataset(
            pixels,
            profile,
            patient_id=patient_id,
            patient_name=f"SYN^{tag}P{study.patient_no:04d}",
            study_uid=_uid(seed, "study", *keys),
            series_uid=_uid(seed, "series", *keys),
            sop_uid=_uid(seed, "image", *keys),
            study_no=study.study_no,
            date=date,
            accession=f"{tag}{idx + 1:06d}",
            institution=institution,
        )
        path = dicom_dir / patient_id / f"study{study.study_no:02d}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        rows.append((str(ds.StudyInstanceUID), patient_id, study.label))

    rows.sort()
    with (root / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["StudyInstanceUID", "PatientID", "label"])
        writer.writerows(rows)


def _stable_hash(text: str) -> int:
    """A stable 32-bit integer of a string (Python's ``hash`` is salted per process)."""
    value = 2166136261
    for byte in text.encode("utf-8"):
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value


def _dataset(
    pixels: np.ndarray,
    profile: ScannerProfile,
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    study_no: int,
    date: dt.date,
    accession: str,
    institution: str,
) -> Dataset:
    """One chest radiograph as a DX (PS3.3 A.26) or CR (PS3.3 A.2) image dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(profile.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = profile.sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{9 + study_no:02d}3000"
    ds.AccessionNumber = accession
    ds.Modality = profile.modality
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = institution
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CHEST PA (SYNTHETIC)"
    ds.ManufacturerModelName = profile.model
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic data: no real patient"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{study_no}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if profile.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImagerPixelSpacing = [profile.pixel_spacing_mm, profile.pixel_spacing_mm]
    ds.PixelSpacing = [profile.pixel_spacing_mm, profile.pixel_spacing_mm]
    if profile.modality == "DX" or profile.rescale_slope != 1.0 or profile.rescale_intercept:
        ds.RescaleIntercept = f"{profile.rescale_intercept:g}"
        ds.RescaleSlope = f"{profile.rescale_slope:g}"
        ds.RescaleType = "US"

    rows, cols = pixels.shape
    top = 2**profile.bits_stored - 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = 0
    centre = profile.rescale_intercept + profile.rescale_slope * top / 2
    ds.WindowCenter = f"{centre:g}"
    ds.WindowWidth = f"{profile.rescale_slope * top:g}"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds
