"""Folder import, the import report, data minimisation and the data summary (real DICOM files
written with pydicom or shipped in pydicom's wheel, real SQLite)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian, generate_uid

from shared.errors import DataError
from shared.synthetic import generate_federation
from site_client.cli import main
from site_client.core.intake import importer
from site_client.core.intake.importer import (
    ImportProgress,
    ImportReport,
    import_files,
    import_folder,
    read_header,
)
from site_client.core.intake.index import InstanceRecord, Rejection, SiteIndex
from site_client.core.intake.summary import data_summary

CODES = {
    "data.not_dicom",
    "data.truncated",
    "data.no_pixels",
    "data.unsupported_transfer_syntax",
    "data.missing_tags",
    "data.duplicate",
    "data.unreadable",
}
SECRET = b"s" * 32
DX = "1.2.840.10008.5.1.4.1.1.1.1"

# identifying values that must never reach the index
PATIENT_NAME = "DOE^JANE^QUIXOTIC"
BIRTH_DATE = "19450317"
REFERRER = "HOUSE^GREGORY^REFERRER"
ADDRESS = "42 Wisteria Lane Springfield"
PATIENT_ID = "MRN-778899-XQ"
ACCESSION = "ACC-554433-ZV"


def write_image(
    path: Path,
    *,
    sop_uid: str | None = None,
    study_uid: str = "1.2.826.0.1.3680043.8.498.1",
    series_uid: str = "1.2.826.0.1.3680043.8.498.2",
    patient_id: str = PATIENT_ID,
    accession: str = ACCESSION,
    size: int = 8,
    sop_class: str = DX,
    pixels: bool = True,
    manufacturer: str = "Synthetica Medical",
    model: str = "LumaDR 500",
) -> str:
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240115"
    ds.AccessionNumber = accession
    ds.Modality = "DX"
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.InstitutionAddress = ADDRESS
    ds.ReferringPhysicianName = REFERRER
    ds.PatientName = PATIENT_NAME
    ds.PatientID = patient_id
    ds.PatientBirthDate = BIRTH_DATE
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    if pixels:
        ds.PixelSpacing = [0.3, 0.3]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = b"\x01\x00" * size * size
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return sop_uid


@pytest.fixture
def index(tmp_path: Path):
    idx = SiteIndex(tmp_path / "site" / "index.db", SECRET)
    yield idx
    idx.close()


def a_folder(root: Path, n: int = 12) -> Path:
    """``n`` images in three studies, plus one non-DICOM file, one SR and one duplicate."""
    for i in range(n):
        write_image(
            root / f"p{i % 3}" / f"im{i:03d}.dcm",
            sop_uid=f"1.2.826.0.1.3680043.8.498.100.{i}",
            study_uid=f"1.2.826.0.1.3680043.8.498.200.{i % 3}",
            series_uid=f"1.2.826.0.1.3680043.8.498.300.{i % 3}",
            patient_id=f"{PATIENT_ID}-{i % 3}",
        )
    (root / "notes.txt").write_text("not an image\n")
    write_image(root / "p0" / "report.dcm", sop_class="1.2.840.10008.5.1.4.1.1.88.11", pixels=False)
    shutil.copy2(root / "p0" / "im000.dcm", root / "p1" / "zz_copy_of_im000.dcm")
    return root


def snapshot(index: SiteIndex) -> tuple[Any, ...]:
    return (
        [r for r in index.instances()],
        index.rejections(),
        sorted(r["patient_key"] for r in index.table("patients").rows),
        sorted(r["study_uid"] for r in index.table("studies").rows),
        sorted(r["series_uid"] for r in index.table("series").rows),
    )


# -- every file pydicom ships ----------------------------------------------------------------


def test_every_file_in_pydicoms_wheel_is_indexed_or_rejected(tmp_path, index, monkeypatch):
    downloads: list[str] = []
    monkeypatch.setattr(
        pydicom.data.data_manager, "data_path_with_download", lambda *a, **k: downloads.append(a)
    )
    shipped = Path(pydicom.data.__file__).parent / "test_files"
    files = [Path(f) for f in pydicom.data.get_testdata_files() if os.path.isfile(f)]
    files = [f for f in files if shipped in f.parents]
    assert downloads == [], "get_testdata_files tried to download"
    assert len(files) > 150
    for f in files:
        dst = tmp_path / "in" / f.relative_to(shipped)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst)

    report = import_folder(index, tmp_path / "in")

    assert report.files_total == len(files)
    assert report.indexed + report.rejected == len(files)
    assert report.indexed == index.count("instances") > 40
    assert {r.code for r in report.rejections} <= CODES
    assert all(r.reason and "Traceback" not in r.reason for r in report.rejections)
    assert index.check_consistency() == []
    by_name = {Path(r.path).name: r for r in report.rejections}
    assert by_name["reportsi.dcm"].code == "data.no_pixels"
    assert "SR" in by_name["reportsi.dcm"].reason
    assert by_name["MR_truncated.dcm"].code == "data.truncated"
    assert by_name["README.txt"].code == "data.not_dicom"
    assert by_name["DICOMDIR"].code == "data.no_pixels"
    assert by_name["JPEGLSNearLossless_08.dcm"].code == "data.missing_tags"
    assert "StudyInstanceUID" in by_name["JPEGLSNearLossless_08.dcm"].reason
    assert by_name["MR_small_RLE.dcm"].code == "data.duplicate"  # same SOP UID as MR_small
    mr = next(r for r in index.instances() if r.path.endswith(os.sep + "MR_small.dcm"))
    assert (mr.rows, mr.columns, mr.bits_stored, mr.modality) == (64, 64, 16, "MR")
    assert mr.photometric == "MONOCHROME2" and mr.pixel_spacing
    syntaxes = {r.transfer_syntax for r in index.instances()}
    assert {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"} & syntaxes


@pytest.mark.parametrize("syntax", [MPEG2MPML, "1.2.826.0.1.3680043.8.498.99.1"])
def test_a_transfer_syntax_nothing_decodes_is_rejected(tmp_path, syntax):
    path = tmp_path / "video.dcm"
    write_image(path)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds.save_as(path, enforce_file_format=True)

    result = read_header(path, lambda value, kind: "key")

    assert isinstance(result, Rejection)
    assert result.code == "data.unsupported_transfer_syntax"
    assert "no installed decoder" in result.reason


def test_cut_off_copies_are_truncated_never_indexed(tmp_path):
    whole = tmp_path / "whole.dcm"
    write_image(whole, size=32)
    data = whole.read_bytes()
    for cut in (len(data) - 1, len(data) - 1000, 700, 300, 200):
        part = tmp_path / f"cut{cut}.dcm"
        part.write_bytes(data[:cut])
        result = read_header(part, lambda value, kind: "key")
        assert isinstance(result, Rejection), cut
        assert result.code in {"data.truncated", "data.no_pixels"}, (cut, result)
    part.write_bytes(data[: len(data) - 10])
    assert read_header(part, lambda v, k: "key").code == "data.truncated"  # type: ignore[union-attr]


def test_read_header_keeps_what_the_index_needs(tmp_path):
    path = tmp_path / "a.dcm"
    sop = write_image(path, size=16)
    idx_key = {"patient": "P", "accession": "A"}

    record = read_header(path, lambda value, kind: f"{idx_key[kind]}:{value}")

    assert isinstance(record, InstanceRecord)
    assert record.sop_uid == sop
    assert record.patient_key == f"P:{PATIENT_ID}"
    assert record.accession_key == f"A:{ACCESSION}"
    assert (record.rows, record.columns, record.frames, record.bits_stored) == (16, 16, 1, 12)
    assert record.pixel_spacing == "0.3\\0.3"
    assert (record.manufacturer, record.model, record.body_part) == (
        "Synthetica Medical",
        "LumaDR 500",
        "CHEST",
    )
    assert record.transfer_syntax == ExplicitVRLittleEndian
    assert record.size == path.stat().st_size and record.mtime_ns == path.stat().st_mtime_ns


# -- incremental ---------------------------------------------------------------------------


def test_the_first_import_reports_every_file(tmp_path, index):
    root = a_folder(tmp_path / "dicom")
    seen: list[ImportProgress] = []

    report = import_folder(index, root, progress=seen.append, batch_size=5)

    assert (report.indexed, report.rejected, report.unchanged, report.removed) == (12, 3, 0, 0)
    assert not report.cancelled
    codes = sorted(r.code for r in report.rejections)
    assert codes == ["data.duplicate", "data.no_pixels", "data.not_dicom"]
    dup = next(r for r in report.rejections if r.code == "data.duplicate")
    assert dup.path.endswith("zz_copy_of_im000.dcm") and "im000.dcm" in dup.reason
    assert seen[0].files_total == 15 and seen[0].files_seen == 0
    assert seen[-1].files_seen == 15 and len(seen) >= 4
    assert index.count("instances") == 12 and index.count("studies") == 3
    assert json.loads(json.dumps(report.to_dict()))["indexed"] == 12
    assert "12 files indexed" in report.summary()


def test_a_second_import_of_an_unchanged_folder_opens_no_file(tmp_path, index, monkeypatch):
    root = a_folder(tmp_path / "dicom")
    import_folder(index, root)
    opened: list[str] = []
    real_dcmread, real_open = pydicom.dcmread, open
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: opened.append("dcmread"))
    monkeypatch.setattr(
        importer, "open", lambda *a, **k: opened.append("open") or real_open(*a, **k), raising=False
    )

    report = import_folder(index, root)

    assert opened == []
    assert (report.unchanged, report.indexed, report.rejected, report.removed) == (15, 0, 0, 0)
    assert real_dcmread is not None


def test_a_changed_file_is_read_again_and_a_deleted_one_forgotten(tmp_path, index, monkeypatch):
    root = a_folder(tmp_path / "dicom")
    (root / "p1" / "zz_copy_of_im000.dcm").unlink()  # (a removal re-checks duplicates)
    import_folder(index, root)
    changed = root / "p1" / "im001.dcm"
    write_image(changed, sop_uid="1.2.826.0.1.3680043.8.498.100.1", size=12)  # new size, mtime
    os.utime(changed, ns=(10**18, 10**18))
    (root / "p2" / "im002.dcm").unlink()
    calls: list[str] = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda f, **k: calls.append(f.name) or real(f, **k))

    report = import_folder(index, root)

    assert calls == [str(changed)]
    assert (report.indexed, report.unchanged, report.removed, report.rejected) == (1, 12, 1, 0)
    assert index.instance("1.2.826.0.1.3680043.8.498.100.1").rows == 12  # type: ignore[union-attr]
    assert index.instance("1.2.826.0.1.3680043.8.498.100.2") is None
    assert index.check_consistency() == []


def test_a_duplicate_gets_indexed_when_the_first_copy_goes(tmp_path, index):
    root = a_folder(tmp_path / "dicom")
    import_folder(index, root)
    (root / "p0" / "im000.dcm").unlink()

    report = import_folder(index, root)

    assert report.removed == 1 and report.indexed == 1
    record = index.instance("1.2.826.0.1.3680043.8.498.100.0")
    assert record is not None and record.path.endswith("zz_copy_of_im000.dcm")
    assert "data.duplicate" not in {r.code for r in index.rejections()}


def test_a_missing_folder_is_an_error_not_an_empty_folder(tmp_path, index):
    root = a_folder(tmp_path / "dicom")
    import_folder(index, root)
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        import_folder(index, tmp_path / "unmounted")
    moved = tmp_path / "elsewhere"
    root.rename(moved)
    with pytest.raises(DataError, match="is the disk or share connected"):
        import_folder(index, root)
    assert index.count("instances") == 12


def test_import_files_for_received_objects(tmp_path, index):
    a = tmp_path / "pacs" / "a.dcm"
    b = tmp_path / "pacs" / "b.dcm"
    sop = write_image(a)
    shutil.copy2(a, b)

    first = import_files(index, [a, tmp_path / "pacs" / "gone.dcm"])
    second = import_files(index, [a, b])

    assert (first.indexed, first.rejected) == (1, 1)
    assert first.rejections[0].code == "data.unreadable"
    assert (second.unchanged, second.rejected) == (1, 1)
    assert second.rejections[0].code == "data.duplicate"
    assert index.instance(sop).path == str(a)  # type: ignore[union-attr]


# -- interruption ------------------------------------------------------------------------


def written(index: SiteIndex) -> int:
    return index.count("instances") + index.count("rejections")


def reference(tmp_path: Path, root: Path) -> tuple[Any, ...]:
    ref = SiteIndex(tmp_path / "reference.db", SECRET)
    import_folder(ref, root, batch_size=4)
    try:
        return snapshot(ref)
    finally:
        ref.close()


def test_a_cancelled_import_keeps_its_batches_and_the_next_one_finishes(tmp_path, index):
    root = a_folder(tmp_path / "dicom")
    asked = iter(range(100))

    report = import_folder(index, root, should_stop=lambda: next(asked) >= 9, batch_size=4)

    assert report.cancelled
    assert written(index) == 9 == report.indexed + report.rejected  # 2 batches and the rest
    assert index.check_consistency() == []
    assert "run the import again" in report.summary()
    done = import_folder(index, root, batch_size=4)
    assert not done.cancelled and done.unchanged == 9
    assert snapshot(index) == reference(tmp_path, root)


def test_ctrl_c_in_the_progress_callback_leaves_a_consistent_index(tmp_path, index):
    root = a_folder(tmp_path / "dicom")
    calls = iter(range(100))

    def progress(p: ImportProgress) -> None:
        if next(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_folder(index, root, progress=progress, batch_size=4)

    assert written(index) == 8  # the batches before the interruption
    assert index.check_consistency() == []
    status = [r["status"] for r in index.table("import_runs").rows]
    assert status == ["interrupted"]
    import_folder(index, root, batch_size=4)
    assert snapshot(index) == reference(tmp_path, root)


def test_a_crash_while_reading_leaves_a_consistent_index(tmp_path, index, monkeypatch):
    root = a_folder(tmp_path / "dicom")
    real = importer._read_file
    count = iter(range(100))

    def crashing(path: str, pseudonym: Any) -> Any:
        if next(count) == 6:
            raise KeyboardInterrupt  # the power goes, mid-batch
        return real(path, pseudonym)

    monkeypatch.setattr(importer, "_read_file", crashing)
    with pytest.raises(KeyboardInterrupt):
        import_folder(index, root, batch_size=4)
    monkeypatch.setattr(importer, "_read_file", real)

    assert written(index) == 4  # the first batch; the second was rolled back
    assert index.check_consistency() == []
    report = import_folder(index, root, batch_size=4)
    assert report.unchanged == 4
    assert snapshot(index) == reference(tmp_path, root)


# -- data minimisation ---------------------------------------------------------------------


def test_the_index_holds_no_names_dates_or_addresses(tmp_path, index):
    root = a_folder(tmp_path / "dicom")
    write_image(root / "single.dcm", patient_id=PATIENT_ID, accession=ACCESSION)
    import_folder(index, root)

    stored = b"".join(
        p.read_bytes() for p in index.path.parent.iterdir() if p.name.startswith("index.db")
    )
    assert len(stored) > 10_000
    for value in (PATIENT_NAME, "QUIXOTIC", BIRTH_DATE, REFERRER, ADDRESS, "Wisteria"):
        assert value.encode() not in stored, value
    assert PATIENT_ID.encode() not in stored
    assert ACCESSION.encode() not in stored
    assert index.pseudonym(PATIENT_ID, "patient").encode() in stored
    assert index.pseudonym(ACCESSION, "accession").encode() in stored


# -- summary -------------------------------------------------------------------------------


def test_the_summary_counts_the_scanner_fingerprint(tmp_path, index):
    manifest = generate_federation(
        tmp_path / "fed", sites=2, images_per_site=[12, 8], test_images=0, image_size=64
    )
    for site in manifest.sites:
        import_folder(index, site.dicom_dir)

    summary = data_summary(index)

    assert summary.images == 20
    assert summary.patients == sum(s.n_patients for s in manifest.sites)
    scanners = dict(summary.by_scanner)
    for site in manifest.sites:
        assert scanners[f"{site.manufacturer} {site.model}"] == site.n_images
    assert dict(summary.by_image_size) == {"64 x 64": 20}
    assert sum(n for _, n in summary.by_modality) == 20
    assert sum(n for _, n in summary.by_pixel_spacing) == 20
    assert all(key.endswith(" mm") for key, _ in summary.by_pixel_spacing)
    assert sum(n for _, n in summary.by_bits_stored) == 20
    assert {k for k, _ in summary.by_photometric} <= {"MONOCHROME1", "MONOCHROME2"}
    assert summary.by_label == ()  # no labels attached yet
    text = json.dumps(summary.to_dict())
    assert json.dumps(data_summary(index).to_dict()) == text  # deterministic
    for record in index.instances():  # counts only: no identifier of any kind
        for value in (record.study_uid, record.patient_key, record.sop_uid, record.path):
            assert value not in text


def test_the_summary_counts_labels_when_there_are_some(tmp_path, index):
    root = a_folder(tmp_path / "dicom")
    import_folder(index, root)
    index.table("labels").insert_all(
        [
            {"study_uid": "1.2.826.0.1.3680043.8.498.200.0", "label_name": "label", "value": "1"},
            {"study_uid": "1.2.826.0.1.3680043.8.498.200.1", "label_name": "label", "value": "0"},
        ]
    )

    summary = data_summary(index)

    assert summary.to_dict()["by_label"] == {"label": {"0": 4, "1": 4, "(no label)": 4}}
    assert "label 'label'" in summary.summary()


# -- command line --------------------------------------------------------------------------


def test_cli_import_and_summary_as_json(tmp_path, capsys):
    root = a_folder(tmp_path / "dicom")
    data_dir = tmp_path / "site"

    assert main(["--data-dir", str(data_dir), "import", str(root), "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert (report["indexed"], report["rejected"], report["cancelled"]) == (12, 3, False)
    assert {r["code"] for r in report["rejections"]} == {
        "data.duplicate",
        "data.no_pixels",
        "data.not_dicom",
    }
    assert "15/15 files" in err

    assert main(["--data-dir", str(data_dir), "import", str(root)]) == 0
    out, _ = capsys.readouterr()
    assert "0 files indexed, 15 unchanged" in out

    assert main(["--data-dir", str(data_dir), "summary", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 12 and summary["by_modality"] == {"DX": 12}

    assert main(["--data-dir", str(data_dir), "summary"]) == 0
    assert "12 images of 3 patients" in capsys.readouterr().out


def test_cli_import_of_a_missing_folder_says_so(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path / "site"), "import", str(tmp_path / "nope")]) == 2
    assert "error [data.folder_not_found]" in capsys.readouterr().err


def test_report_is_frozen() -> None:
    report = ImportReport(
        run_id="r",
        files_total=0,
        indexed=0,
        unchanged=0,
        rejected=0,
        removed=0,
        cancelled=False,
        seconds=0.0,
    )
    with pytest.raises(AttributeError):
        report.indexed = 1  # type: ignore[misc]


def test_sites_opened_at_once_agree_on_one_pseudonym_key(tmp_path):
    """The app's background tasks may open a new site's index together: one key, no error."""
    from concurrent.futures import ThreadPoolExecutor

    from site_client.core.intake.index import load_or_create_secret

    path = tmp_path / "keys" / "pseudonym.key"
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: load_or_create_secret(path), range(32)))
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert path.read_bytes() == keys[0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["pseudonym.key"]
