"""The shared DICOM reader: intensities, shapes, rejections, label CSVs, patient split."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from shared.errors import DataError
from shared.imaging import load_labelled_folder, patient_split, pixels_to_input


def _image(
    values: np.ndarray,
    *,
    photometric="MONOCHROME2",
    slope=None,
    intercept=None,
    bits=12,
    patient="SYN-1",
    study_uid=None,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient
    ds.Modality = "OT"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = values.astype("<u2").tobytes()
    return ds


def _ramp(size=16, top=4095) -> np.ndarray:
    """Dense (bright) on the right: a left-to-right ramp."""
    return np.tile(np.linspace(0, top, size), (size, 1)).round()


def test_monochrome1_and_rescale_give_the_same_orientation_as_monochrome2():
    ramp = _ramp()
    reference = pixels_to_input(_image(ramp), 8)
    inverted = pixels_to_input(_image(4095 - ramp, photometric="MONOCHROME1"), 8)
    rescaled = pixels_to_input(_image(ramp, slope=2.0, intercept=-1024.0), 8)
    np.testing.assert_allclose(inverted, reference, atol=1e-5)
    np.testing.assert_allclose(rescaled, reference, atol=1e-5)
    assert reference[0, :, -1].mean() > reference[0, :, 0].mean()  # bright = dense


def test_output_shape_dtype_and_zscore():
    out = pixels_to_input(_image(_ramp(20)), 12)
    assert out.shape == (1, 12, 12)
    assert out.dtype == np.float32
    assert abs(float(out.mean())) < 1e-5
    assert float(out.std()) == pytest.approx(1.0, abs=1e-4)
    flat = pixels_to_input(_image(np.full((8, 8), 7.0)), 4)  # constant image: zeros, no NaN
    assert np.all(flat == 0)


def test_pydicom_bundled_files_are_read():
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    out = pixels_to_input(ct, 32)
    assert out.shape == (1, 32, 32) and np.isfinite(out).all()
    np.testing.assert_array_equal(out, pixels_to_input(ct, 32))  # deterministic
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False))
    assert pixels_to_input(mr, 16).shape == (1, 16, 16)


def _write_folder(tmp_path: Path, n=6) -> tuple[Path, Path, list[Dataset]]:
    folder = tmp_path / "dicom"
    folder.mkdir()
    rng = np.random.default_rng(0)
    datasets = []
    for i in range(n):
        ds = _image(rng.integers(0, 4096, (16, 16)), patient=f"SYN-{i // 2}")
        ds.save_as(folder / f"img{i}.dcm", enforce_file_format=True)
        datasets.append(ds)
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["StudyInstanceUID", "PatientID", "label"])
        for i, ds in enumerate(datasets):
            w.writerow([ds.StudyInstanceUID, ds.PatientID, i % 2])
    return folder, labels, datasets


def test_load_folder_sorted_by_study_uid(tmp_path):
    folder, labels, datasets = _write_folder(tmp_path)
    data = load_labelled_folder(folder, labels, input_size=8)
    assert data.images.shape == (6, 1, 8, 8) and data.images.dtype == np.float32
    assert data.labels.dtype == np.float32
    assert list(data.study_uids) == sorted(ds.StudyInstanceUID for ds in datasets)
    by_uid = {ds.StudyInstanceUID: (ds.PatientID, i % 2) for i, ds in enumerate(datasets)}
    for uid, pid, label in zip(data.study_uids, data.patient_ids, data.labels, strict=True):
        assert by_uid[uid] == (pid, label)
    assert data.rejected == ()


def test_corrupt_unlabelled_and_non_binary_files_are_rejected_with_reasons(tmp_path):
    folder, labels, _ = _write_folder(tmp_path)
    (folder / "corrupt.dcm").write_bytes(b"DICM? no, just garbage" * 10)
    _image(_ramp()).save_as(folder / "unlabelled.dcm", enforce_file_format=True)
    odd = _image(_ramp())
    odd.save_as(folder / "odd_label.dcm", enforce_file_format=True)
    with labels.open("a", newline="") as fh:
        csv.writer(fh).writerow([odd.StudyInstanceUID, odd.PatientID, "2"])
    shutil.copy(folder / "img0.dcm", folder / "zz_copy_of_img0.dcm")

    data = load_labelled_folder(folder, labels, input_size=8)
    assert len(data) == 6
    reasons = {r.path.name: r.reason for r in data.rejected}
    assert set(reasons) == {"corrupt.dcm", "unlabelled.dcm", "odd_label.dcm", "zz_copy_of_img0.dcm"}
    assert "not a readable DICOM" in reasons["corrupt.dcm"]
    assert "no label" in reasons["unlabelled.dcm"]
    assert "not 0 or 1" in reasons["odd_label.dcm"]
    assert "already loaded" in reasons["zz_copy_of_img0.dcm"]


def test_sop_instance_uid_column_is_used_when_present(tmp_path):
    folder, _, datasets = _write_folder(tmp_path, n=2)
    labels = tmp_path / "by_sop.csv"
    labels.write_text(
        "SOPInstanceUID,label\n" + "".join(f"{ds.SOPInstanceUID},1\n" for ds in datasets)
    )
    assert load_labelled_folder(folder, labels, input_size=4).labels.tolist() == [1.0, 1.0]


def test_labels_csv_without_the_needed_columns_raises(tmp_path):
    folder, _, _ = _write_folder(tmp_path, n=1)
    bad = tmp_path / "bad.csv"
    bad.write_text("AccessionNumber,label\nA1,1\n")
    with pytest.raises(DataError, match=r"lacks the column.*StudyInstanceUID") as info:
        load_labelled_folder(folder, bad, input_size=4)
    assert info.value.code == "data.labels"
    bad.write_text("StudyInstanceUID,finding\n1.2.3,1\n")
    with pytest.raises(DataError, match=r"lacks the column.*'diagnosis'"):
        load_labelled_folder(folder, bad, input_size=4, label_column="diagnosis")
    with pytest.raises(DataError, match="cannot be read") as info:
        load_labelled_folder(folder, tmp_path / "missing.csv", input_size=4)
    assert info.value.code == "data.labels"


def test_nothing_usable_raises_data_empty(tmp_path):
    folder, _, _ = _write_folder(tmp_path, n=2)
    labels = tmp_path / "other.csv"
    labels.write_text("StudyInstanceUID,label\n1.2.3.4,1\n")
    with pytest.raises(DataError, match="No usable labelled images") as info:
        load_labelled_folder(folder, labels, input_size=4)
    assert info.value.code == "data.empty"


def test_patient_split_keeps_patients_together_and_is_deterministic():
    pids = [f"SYN-{i % 23}" for i in range(100)]
    train, hold = patient_split(pids, 0.2, seed=5)
    assert sorted(np.concatenate([train, hold]).tolist()) == list(range(100))
    assert not {pids[i] for i in train} & {pids[i] for i in hold}
    assert len({pids[i] for i in hold}) == round(0.2 * 23)
    again = patient_split(list(reversed(pids)), 0.2, seed=5)[1]
    assert {pids[::-1][i] for i in again} == {pids[i] for i in hold}  # order does not matter
    other = patient_split(pids, 0.2, seed=6)[1]
    assert {pids[i] for i in other} != {pids[i] for i in hold}
    assert len(patient_split(["a", "b"], 0.01, seed=0)[1]) == 1  # at least one held out
    with pytest.raises(DataError, match="hold-out fraction"):
        patient_split(pids, 1.0)
