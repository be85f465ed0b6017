"""Labels CSV -> study labels in the index: every key type, conflicts, no identifier in clear."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import DataError
from site_client.core.intake.index import InstanceRecord, SiteIndex
from site_client.core.intake.labels import attach_labels, study_key, study_labels

SECRET = b"k" * 32

# patient -> accession, study -> instances
LAYOUT = {
    "SYN-P-0001": {
        "1.2.1": ("ACC-0001", ["1.2.1.1", "1.2.1.2"]),
        "1.2.2": ("ACC-0002", ["1.2.2.1"]),
    },
    "SYN-P-0002": {"1.2.3": ("ACC-0003", ["1.2.3.1"])},
    "SYN-P-0003": {"1.2.4": ("", ["1.2.4.1"])},
}


def _record(index: SiteIndex, patient: str, study: str, accession: str, sop: str) -> InstanceRecord:
    return InstanceRecord(
        sop_uid=sop,
        path=f"/data/{sop}.dcm",
        size=1000,
        mtime_ns=1,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        patient_key=index.pseudonym(patient, "patient"),
        study_uid=study,
        series_uid=study + ".9",
        accession_key=index.pseudonym(accession, "accession"),
        modality="CR",
        body_part="CHEST",
        manufacturer="Synthetic",
        model="S1",
        rows=64,
        columns=64,
        frames=1,
        pixel_spacing="",
        bits_stored=12,
        photometric="MONOCHROME2",
        transfer_syntax="1.2.840.10008.1.2.1",
    )


@pytest.fixture
def index(tmp_path: Path):
    idx = SiteIndex(tmp_path / "index.db", SECRET)
    records = [
        _record(idx, patient, study, acc, sop)
        for patient, studies in LAYOUT.items()
        for study, (acc, sops) in studies.items()
        for sop in sops
    ]
    run = idx.start_run("/data", 0.0)
    idx.record_batch(records, [], run)
    yield idx
    idx.close()


def _csv(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, "utf-8")
    return path


def test_study_uid_labels_are_stored_per_study(index, tmp_path):
    path = _csv(tmp_path, "StudyInstanceUID,label\n1.2.1,1\n1.2.2,0\n1.2.3,1\n")
    report = attach_labels(index, path)
    assert study_labels(index) == {"1.2.1": "1", "1.2.2": "0", "1.2.3": "1"}
    assert report.key_columns == ("StudyInstanceUID",)
    assert (report.rows, report.matched_rows) == (3, 3)
    assert (report.labelled_studies, report.unlabelled_studies) == (3, 1)
    assert report.ok


def test_sop_uid_label_goes_to_its_study(index, tmp_path):
    path = _csv(tmp_path, "sop_instance_uid,Label\n1.2.1.2,1\n1.2.4.1,0\n")
    report = attach_labels(index, path, label_column="label")
    assert study_labels(index) == {"1.2.1": "1", "1.2.4": "0"}
    assert report.key_columns == ("SOPInstanceUID",)


def test_accession_number_is_matched_through_its_pseudonym(index, tmp_path):
    path = _csv(tmp_path, "Accession Number;finding\nACC-0002;1\nACC-0003;0\n".replace(";", ","))
    report = attach_labels(index, path, label_column="finding")
    assert study_labels(index, "finding") == {"1.2.2": "1", "1.2.3": "0"}
    assert report.key_columns == ("AccessionNumber",)


def test_patient_id_label_applies_to_all_that_patients_studies(index, tmp_path):
    path = _csv(tmp_path, "PATIENTID,label\nSYN-P-0001,1\n SYN-P-0002 ,0\n")
    report = attach_labels(index, path)
    assert study_labels(index) == {"1.2.1": "1", "1.2.2": "1", "1.2.3": "0"}
    assert report.labelled_studies == 3 and report.matched_rows == 2


def test_the_raw_value_is_stored(index, tmp_path):
    attach_labels(index, _csv(tmp_path, "StudyInstanceUID,label\n1.2.1,1.0\n"))
    assert study_labels(index) == {"1.2.1": "1.0"}


def test_each_row_uses_its_most_specific_key(index, tmp_path):
    # the synthetic federation's layout: StudyInstanceUID and PatientID on every row
    text = "StudyInstanceUID,PatientID,label\n1.2.3,SYN-P-0001,1\n,SYN-P-0003,0\n"
    report = attach_labels(index, _csv(tmp_path, text))
    assert study_labels(index) == {"1.2.3": "1", "1.2.4": "0"}
    assert report.key_columns == ("StudyInstanceUID", "PatientID")


def test_explicit_key_uses_that_column_only(index, tmp_path):
    text = "StudyInstanceUID,PatientID,label\n1.2.3,SYN-P-0001,1\n"
    report = attach_labels(index, _csv(tmp_path, text), key="patientid")
    assert study_labels(index) == {"1.2.1": "1", "1.2.2": "1"}
    assert report.key_columns == ("PatientID",)


def test_conflicting_labels_leave_the_study_unlabelled_and_are_reported(index, tmp_path):
    text = (
        "SOPInstanceUID,PatientID,label\n"
        ",SYN-P-0001,1\n"  # both of patient 1's studies: 1
        "1.2.1.2,,0\n"  # one image of study 1.2.1 says 0
        "1.2.2.1,,1\n"  # agrees with the patient row: no conflict
    )
    report = attach_labels(index, _csv(tmp_path, text))
    assert study_labels(index) == {"1.2.2": "1"}
    assert report.conflicting_studies == (study_key(index, "1.2.1"),)
    assert "1.2.1" not in " ".join(report.conflicting_studies)
    assert not report.ok
    assert "1 studies have conflicting labels" in report.summary()


def test_unmatched_and_invalid_rows_are_reported_by_line_number(index, tmp_path):
    text = "StudyInstanceUID,label\n1.2.1,1\n9.9.9,0\n\n1.2.2,maybe\n1.2.3,\n,1\n"
    report = attach_labels(index, _csv(tmp_path, text))
    assert report.unmatched_rows == (3, 7)
    assert report.invalid_rows == (5, 6)
    assert (report.rows, report.matched_rows) == (5, 1)
    assert study_labels(index) == {"1.2.1": "1"}
    assert "lines 3, 7" in report.summary()


def test_the_report_holds_no_identifier(index, tmp_path):
    text = "PatientID,AccessionNumber,label\nSYN-P-0001,,1\nSYN-NOBODY,,0\n,ACC-0003,x\n"
    report = attach_labels(index, _csv(tmp_path, text))
    shown = repr(report) + report.summary() + str(report.to_dict())
    for ident in ("SYN-P-0001", "SYN-NOBODY", "ACC-0003", "1.2.1", "1.2.2"):
        assert ident not in shown


def test_a_new_load_replaces_the_previous_load_of_that_column(index, tmp_path):
    attach_labels(index, _csv(tmp_path, "StudyInstanceUID,label\n1.2.1,1\n1.2.2,1\n"))
    attach_labels(index, _csv(tmp_path, "StudyInstanceUID,other\n1.2.3,0\n"), label_column="other")
    attach_labels(index, _csv(tmp_path, "StudyInstanceUID,label\n1.2.3,0\n", "second.csv"))
    assert study_labels(index) == {"1.2.3": "0"}
    assert study_labels(index, "other") == {"1.2.3": "0"}


def test_patient_and_accession_ids_are_never_stored_in_clear(index, tmp_path):
    text = "PatientID,label\nSYN-P-0001,1\nSYN-P-0002,0\n"
    attach_labels(index, _csv(tmp_path, text))
    attach_labels(index, _csv(tmp_path, "AccessionNumber,b\nACC-0003,1\n"), label_column="b")
    index.db.execute("pragma wal_checkpoint(FULL)")
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("index.db*"))
    assert stored  # the scan reads something
    for ident in (b"SYN-P-0001", b"SYN-P-0002", b"ACC-0003"):
        assert ident not in stored


def test_a_file_without_a_key_column_says_what_it_found(index, tmp_path):
    path = _csv(tmp_path, "MRN,label\n1,1\n")
    with pytest.raises(DataError, match=r"no column that identifies.*found: MRN, label") as info:
        attach_labels(index, path)
    assert info.value.code == "data.labels"


def test_a_file_without_the_label_column_says_what_it_found(index, tmp_path):
    path = _csv(tmp_path, "StudyInstanceUID,diagnosis\n1.2.1,1\n")
    with pytest.raises(DataError, match=r"no 'label' column \(found: StudyInstanceUID, diag"):
        attach_labels(index, path)


def test_an_unknown_or_absent_explicit_key_is_refused(index, tmp_path):
    path = _csv(tmp_path, "StudyInstanceUID,label\n1.2.1,1\n")
    with pytest.raises(DataError, match="Unknown key 'MRN'"):
        attach_labels(index, path, key="MRN")
    with pytest.raises(DataError, match="has no PatientID column"):
        attach_labels(index, path, key="PatientID")


def test_an_unreadable_file_is_a_data_error(index, tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="cannot be read"):
        attach_labels(index, path)
    with pytest.raises(DataError, match="cannot be read"):
        attach_labels(index, tmp_path / "missing.csv")
