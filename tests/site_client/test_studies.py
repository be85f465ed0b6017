"""The site app's study list: one row per study, from the real index, and its filter."""

from __future__ import annotations

from pathlib import Path

import pytest

from site_client.core.intake.index import InstanceRecord, SiteIndex
from site_client.core.intake.labels import study_key
from site_client.core.studies import NO_LABEL, LabelChoice, StudyFilter, StudyRow, list_studies

SECRET = b"s" * 32


def _record(sop: str, study: str, series: str, *, modality="CR", maker="Acme", rows=64):
    return InstanceRecord(
        sop_uid=sop,
        path=f"/data/{sop}.dcm",
        size=1000,
        mtime_ns=1,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        patient_key="p-" + study,
        study_uid=study,
        series_uid=series,
        accession_key="",
        modality=modality,
        body_part="CHEST",
        manufacturer=maker,
        model="X1",
        rows=rows,
        columns=rows,
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
        _record("1.1.2", "1.1", "1.1.9"),
        _record("1.1.1", "1.1", "1.1.9"),
        _record("1.1.3", "1.1", "1.1.8", modality="DX", rows=128),
        _record("1.2.1", "1.2", "1.2.9", maker="Zeta"),
    ]
    idx.record_batch(records, [], idx.start_run("/data", 0.0))
    idx.db.execute(
        "insert into labels (study_uid, label_name, value, source) "
        "values ('1.1', 'label', '1', 'x')"
    )
    yield idx
    idx.close()


def test_one_row_per_study_with_counts_and_kinds(index: SiteIndex) -> None:
    rows = {r.study_uid: r for r in list_studies(index)}
    first = rows["1.1"]
    assert (first.images, first.series) == (3, 2)
    assert first.modality == "CR, DX"  # every kind the study has, sorted
    assert first.scanner == "Acme X1"
    assert first.image_size == "128 x 128"  # the largest image
    assert first.label == "1" and first.label_text == "1"
    assert first.key == study_key(index, "1.1") and len(first.key) == 12
    # the preview uses the first instance of the first series
    assert first.preview_path == "/data/1.1.3.dcm"
    second = rows["1.2"]
    assert (second.label, second.label_text) == ("", NO_LABEL)


def test_rows_come_sorted_by_key_and_name_no_uid(index: SiteIndex) -> None:
    rows = list_studies(index)
    assert [r.key for r in rows] == sorted(r.key for r in rows)
    assert all(r.study_uid not in " ".join(r.texts()) for r in rows)


def test_another_label_column_is_read_when_asked(index: SiteIndex) -> None:
    assert all(r.label == "" for r in list_studies(index, "effusion"))


def _row(**kw) -> StudyRow:
    base = dict(
        study_uid="1",
        key="abc123",
        modality="CR",
        body_part="CHEST",
        scanner="Acme X1",
        series=1,
        images=1,
        rows=64,
        columns=64,
        label="",
        preview_path="/p",
    )
    return StudyRow(**{**base, **kw})


@pytest.mark.parametrize(
    ("flt", "row", "kept"),
    [
        (StudyFilter(), _row(), True),
        (StudyFilter("acme"), _row(), True),  # case ignored
        (StudyFilter("acme dx"), _row(), False),  # every word must match
        (StudyFilter("acme cr"), _row(), True),
        (StudyFilter("64 x 64"), _row(), True),  # the shown size
        (StudyFilter("no label"), _row(), True),
        (StudyFilter(label=LabelChoice.NONE), _row(label="0"), False),
        (StudyFilter(label=LabelChoice.NONE), _row(), True),
        (StudyFilter(label=LabelChoice.POSITIVE), _row(label="1.0"), True),
        (StudyFilter(label=LabelChoice.POSITIVE), _row(label="0"), False),
        (StudyFilter(label=LabelChoice.NEGATIVE), _row(label="0"), True),
        (StudyFilter(label=LabelChoice.NEGATIVE), _row(), False),
    ],
)
def test_the_filter(flt: StudyFilter, row: StudyRow, kept: bool) -> None:
    assert flt.accepts(row) is kept
