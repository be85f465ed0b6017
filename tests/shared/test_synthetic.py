"""The synthetic federation: real DICOM, per-site looks, labels that match, determinism."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID

from shared.errors import DataError
from shared.synthetic import generate_federation, profile_for_site


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
