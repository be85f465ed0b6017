"""The synthetic federation: real DICOM, per-site looks, labels that match, determinism."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from shared.errors import DataError
from shared.imaging import load_labelled_folder
from shared.synthetic import (
    HARD_IMAGES_PER_SITE,
    HARD_PROFILES,
    generate_federation,
    profile_for_site,
)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm"))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    out = tmp_path_factory.mktemp("fed")
    return generate_federation(
        out, sites=4, seed=3, images_per_site=12, test_images=8, image_size=32
    )


def test_sites_are_valid_dicom_with_their_scanner_look(fed):
    seen = {}
    for site in fed.sites:
        files = _files(site.dicom_dir)
        assert len(files) == site.n_images == 12
        for path in files:
            ds = pydicom.dcmread(path)  # raises unless a valid Part 10 file
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.SOPClassUID in ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1")
            assert ds.Modality in ("DX", "CR")
            assert ds.BodyPartExamined == "CHEST"
            assert ds.Manufacturer == site.manufacturer
            assert ds.ManufacturerModelName == site.model
            assert str(ds.PatientName).startswith("SYN^")
            assert ds.pixel_array.shape == (32, 32)
            assert int(ds.pixel_array.max()) < 2**ds.BitsStored
            seen.setdefault(site.name, set()).add(
                (ds.BitsStored, ds.PhotometricInterpretation, float(ds.get("RescaleSlope", 1)))
            )
    looks = {name: next(iter(v)) for name, v in seen.items()}
    assert all(len(v) == 1 for v in seen.values())  # one look per site
    assert looks["site-1"] == (12, "MONOCHROME2", 1.0)
    assert looks["site-2"] == (10, "MONOCHROME1", 1.0)
    assert looks["site-3"] == (16, "MONOCHROME2", 2.0)
    assert looks["site-4"][:2] == looks["site-1"][:2]  # profiles cycle past the third ...
    assert fed.sites[3].model != fed.sites[0].model  # ... with a variation
    assert profile_for_site(3).gamma != profile_for_site(0).gamma


def test_uids_are_valid_and_unique_and_some_patients_have_several_studies(fed):
    sop, study, series = set(), set(), set()
    studies_per_patient: dict[str, int] = {}
    for path in _files(fed.root):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
            assert UID(uid).is_valid
        sop.add(ds.SOPInstanceUID)
        study.add(ds.StudyInstanceUID)
        series.add(ds.SeriesInstanceUID)
        studies_per_patient[ds.PatientID] = studies_per_patient.get(ds.PatientID, 0) + 1
    n = 4 * 12 + 8
    assert len(sop) == len(study) == len(series) == n
    assert max(studies_per_patient.values()) >= 2


def test_labels_csv_matches_the_files_and_the_prevalence(fed):
    for site in fed.sites:
        with site.labels_csv.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert list(rows[0]) == ["StudyInstanceUID", "PatientID", "label"]
        files = {
            ds.StudyInstanceUID: ds.PatientID
            for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in _files(site.dicom_dir))
        }
        assert {r["StudyInstanceUID"]: r["PatientID"] for r in rows} == files
        labels = [int(r["label"]) for r in rows]
        assert set(labels) <= {0, 1}
        assert sum(labels) / len(labels) == pytest.approx(site.prevalence, abs=1e-4)
    expected = [profile_for_site(i).prevalence for i in range(3)]
    assert [s.prevalence for s in fed.sites[:3]] == pytest.approx(expected, abs=0.05)
    with fed.test_labels_csv.open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(_files(fed.test_dicom_dir)) == 8


def test_pooled_test_set_mixes_every_site_look(tmp_path):
    m = generate_federation(
        tmp_path, sites=3, seed=1, images_per_site=4, test_images=9, image_size=32
    )
    makers = {
        pydicom.dcmread(p, stop_before_pixels=True).Manufacturer for p in _files(m.test_dicom_dir)
    }
    assert makers == {s.manufacturer for s in m.sites}


def test_manifest_json_is_written_and_relocatable(fed):
    data = json.loads((fed.root / "manifest.json").read_text())
    assert data == fed.to_dict()
    assert data["sites"][0]["dicom_dir"] == "site-1/dicom"
    assert data["test"]["labels_csv"] == "test/labels.csv"


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    args = dict(sites=3, images_per_site=[3, 2, 4], test_images=3, image_size=32)
    a = _tree_bytes(generate_federation(tmp_path / "a", seed=7, **args).root)
    b = _tree_bytes(generate_federation(tmp_path / "b", seed=7, **args).root)
    c = _tree_bytes(generate_federation(tmp_path / "c", seed=8, **args).root)
    assert a == b
    assert len(a) == 3 + 2 + 4 + 3 + 4 + 1  # images, 4 label files, manifest
    dcm_a = {v for k, v in a.items() if k.endswith(".dcm")}
    dcm_c = {v for k, v in c.items() if k.endswith(".dcm")}
    assert len(dcm_c) == 12
    assert not dcm_a & dcm_c


def test_bad_arguments_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="one image count per site"):
        generate_federation(tmp_path, sites=3, images_per_site=[5, 5])
    with pytest.raises(DataError, match="at least one site"):
        generate_federation(tmp_path, sites=0)


# --- the hard setting (issue 6) ------------------------------------------------------------

#: SHA-256 over (relative path, bytes) of every file of the default setting's federation made
#: by ``_default_tree_digest``, computed before the hard setting was added: the default output
#: must stay byte-identical (the demo and the tests above rely on it). Only a pydicom upgrade
#: that changes how it writes files may change it; then check that first, and update it.
DEFAULT_TREE_SHA256 = "845fd89046a163a326587db468064b9eabb00cd685f39ba23e69e4ff479b20c7"


def _default_tree_digest(root: Path) -> str:
    m = generate_federation(
        root, sites=4, seed=3, images_per_site=[3, 2, 4, 2], test_images=5, image_size=32
    )
    h = hashlib.sha256()
    for path, data in _tree_bytes(m.root).items():
        h.update(path.encode())
        h.update(data)
    return h.hexdigest()


def test_default_setting_is_byte_identical_to_before_the_hard_setting(tmp_path):
    assert _default_tree_digest(tmp_path) == DEFAULT_TREE_SHA256
    assert "setting" not in json.loads((tmp_path / "manifest.json").read_text())


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    out = tmp_path_factory.mktemp("hard")
    return generate_federation(
        out, setting="hard", seed=3, images_per_site=[20, 20, 40, 20], test_images=40, image_size=32
    )


def _high_frequency(site_dir: Path) -> float:
    """Mean |4-neighbour Laplacian| of the model inputs: noise and sharpness of a scanner."""
    data = load_labelled_folder(site_dir / "dicom", site_dir / "labels.csv", input_size=32)
    x = data.images[:, 0]
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return float(np.abs(lap).mean())


def test_hard_setting_has_four_scanners_and_label_skew(hard):
    assert [s.name for s in hard.sites] == ["site-1", "site-2", "site-3", "site-4"]
    assert [s.prevalence for s in hard.sites] == [0.15, 0.35, 0.6, 0.8]
    assert len({s.model for s in hard.sites}) == len({s.manufacturer for s in hard.sites}) == 4
    profiles = [profile_for_site(i, "hard") for i in range(4)]
    assert profiles == list(HARD_PROFILES)
    # Shifts a per-image z-score does not undo: transfer curve, noise and blur all spread.
    gammas = sorted(p.gamma for p in profiles)
    assert gammas[-1] / gammas[0] >= 3.0
    assert max(p.noise for p in profiles) / min(p.noise for p in profiles) >= 2.5
    assert max(p.blur_sigma for p in profiles) - min(p.blur_sigma for p in profiles) >= 1.0
    for site in hard.sites:
        models = {
            pydicom.dcmread(p, stop_before_pixels=True).ManufacturerModelName
            for p in _files(site.dicom_dir)
        }
        assert models == {site.model}
        with site.labels_csv.open(newline="") as fh:
            labels = [int(r["label"]) for r in csv.DictReader(fh)]
        assert sum(labels) / len(labels) == site.prevalence
    # ... and the preprocessed images show it: the old CR plate is the noisiest by far.
    hf = [_high_frequency(hard.root / s.name) for s in hard.sites]
    assert hf[1] == max(hf) and hf[1] > 1.3 * min(hf)
    data = json.loads((hard.root / "manifest.json").read_text())
    assert data["setting"] == "hard"


def test_hard_test_set_gives_every_scanner_an_equal_balanced_share(hard):
    by_model: dict[str, list[int]] = {}
    with hard.test_labels_csv.open(newline="") as fh:
        label_of = {r["StudyInstanceUID"]: int(r["label"]) for r in csv.DictReader(fh)}
    for path in _files(hard.test_dicom_dir):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_model.setdefault(str(ds.ManufacturerModelName), []).append(label_of[ds.StudyInstanceUID])
    assert set(by_model) == {s.model for s in hard.sites}
    for site in hard.sites:
        labels = by_model[site.model]
        assert len(labels) == 10  # equal shares, although site-3 is twice as large
        assert sum(labels) == 5  # half positives, whatever the site's own positive rate


def test_hard_setting_defaults_and_bad_arguments(tmp_path):
    assert HARD_IMAGES_PER_SITE and len(HARD_IMAGES_PER_SITE) == len(HARD_PROFILES) == 4
    with pytest.raises(DataError, match="has 4 scanners; ask for at most 4 sites"):
        generate_federation(tmp_path, setting="hard", sites=5)
    with pytest.raises(DataError, match="Unknown synthetic setting 'extreme'"):
        generate_federation(tmp_path, setting="extreme")
    with pytest.raises(DataError, match=r"site index 4 is outside 0\.\.3"):
        profile_for_site(4, "hard")
    with pytest.raises(DataError, match="Unknown synthetic setting 'soft'"):
        profile_for_site(0, "soft")


def test_hard_and_default_uids_never_clash(hard, tmp_path):
    default = generate_federation(
        tmp_path, sites=4, seed=3, images_per_site=20, test_images=40, image_size=32
    )

    def uids(root: Path) -> set[str]:
        return {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in _files(root)
        }

    assert not uids(hard.root) & uids(default.root)
