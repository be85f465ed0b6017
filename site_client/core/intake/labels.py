"""Labels for indexed studies, from a CSV the hospital already has.

Theory of operation: a labels CSV names its images by one of four DICOM identifiers, and
``attach_labels`` turns every row into a label on one or more *studies* of the index:

==================  ================================================  ====================
key column          matched against                                   label goes to
==================  ================================================  ====================
SOPInstanceUID      ``instances.sop_uid``                             that image's study
StudyInstanceUID    ``studies.study_uid``                             that study
AccessionNumber     ``studies.accession_key`` = pseudonym(value)      that study (or the
                                                                      studies sharing it)
PatientID           ``studies.patient_key`` = pseudonym(value)        all that patient's
                                                                      studies
==================  ================================================  ====================

PatientID and AccessionNumber are hashed with the site's key (``SiteIndex.pseudonym``) as the
index does on import, so they are matched without ever being stored in clear. The key column
is found by its header (case and punctuation ignored, e.g. ``Study Instance UID``); when a
file has several, each row uses its most specific non-empty one (SOP, then study, then
accession, then patient), so one file can mix image-, study- and patient-level rows. Pass
``key=`` to use one column only.

A study that two rows label differently (a PatientID row says 1, a SOP row of one of that
patient's images says 0) is *conflicting*: it gets no label rather than a guessed one, and the
report lists it by a short pseudonymous study key (:func:`study_key`). A load replaces the
previous load of the same label column, in one transaction. The report names rows by their
line number in the file (the header is line 1) and studies by pseudonymous keys: it holds no
identifier, so it can be shown, logged or printed as it is.

Values are stored as written (stripped); today's tasks are binary, so a value must read as 0
or 1 (:func:`binary_value`) and any other is reported as invalid and not stored.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import DataError
from site_client.core.intake.index import SiteIndex

__all__ = [
    "KEY_COLUMNS",
    "LabelReport",
    "attach_labels",
    "binary_value",
    "ensure_labels_table",
    "study_key",
    "study_labels",
]

#: The identifiers a labels file may use, most specific first.
KEY_COLUMNS = ("SOPInstanceUID", "StudyInstanceUID", "AccessionNumber", "PatientID")

_ALIASES = {
    "SOPInstanceUID": {"sopinstanceuid", "sopuid"},
    "StudyInstanceUID": {"studyinstanceuid", "studyuid"},
    "AccessionNumber": {"accessionnumber", "accession", "accessionno"},
    "PatientID": {"patientid"},
}

LABELS_TABLE = "labels"


def _norm(header: str) -> str:
    return re.sub(r"[^a-z0-9]", "", header.lower())


def binary_value(value: str) -> float | None:
    """0.0 or 1.0 for a binary label written as 0/1 (also "0.0", "1.0"); else None."""
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number in (0.0, 1.0) else None


def study_key(index: SiteIndex, study_uid: str) -> str:
    """A short pseudonymous name for a study, for reports (keyed: not reversible off-site)."""
    return index.pseudonym(study_uid, "study")[:12]


def ensure_labels_table(index: SiteIndex) -> None:
    """The ``labels`` table: one row per (study, label column); idempotent."""
    if LABELS_TABLE in index.db.table_names():
        return
    with index.transaction():
        index.table(LABELS_TABLE).create(
            {"study_uid": str, "label_name": str, "value": str, "source": str},
            pk=("study_uid", "label_name"),
            if_not_exists=True,
        )
        index.table(LABELS_TABLE).create_index(["label_name"], if_not_exists=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelReport:
    """What a labels file did to the index. Rows are line numbers; studies are short keys."""

    label_column: str
    key_columns: tuple[str, ...]  # the identifier columns used, most specific first
    source: str  # SHA-256 (first 16 hex digits) of the file's bytes
    rows: int  # data rows read (header excluded)
    matched_rows: int
    unmatched_rows: tuple[int, ...]  # no indexed image, study or patient has that key
    invalid_rows: tuple[int, ...]  # the label is empty or not 0/1
    labelled_studies: int
    unlabelled_studies: int  # indexed studies that this file gives no label
    conflicting_studies: tuple[str, ...] = field(default=())  # study_key()s, no label stored

    @property
    def ok(self) -> bool:
        return not (self.unmatched_rows or self.invalid_rows or self.conflicting_studies)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label_column": self.label_column,
            "key_columns": list(self.key_columns),
            "source": self.source,
            "rows": self.rows,
            "matched_rows": self.matched_rows,
            "unmatched_rows": list(self.unmatched_rows),
            "invalid_rows": list(self.invalid_rows),
            "labelled_studies": self.labelled_studies,
            "unlabelled_studies": self.unlabelled_studies,
            "conflicting_studies": list(self.conflicting_studies),
        }

    def summary(self) -> str:
        """Plain-language lines for the command line and the app."""
        lines = [
            f"labels '{self.label_column}' keyed by {', '.join(self.key_columns)}: "
            f"{self.matched_rows} of {self.rows} rows matched; "
            f"{self.labelled_studies} studies labelled, {self.unlabelled_studies} without a label",
        ]
        if self.unmatched_rows:
            lines.append(
                f"  {len(self.unmatched_rows)} rows match no imported image "
                f"(lines {_lines(self.unmatched_rows)}): import those images, or check the IDs"
            )
        if self.invalid_rows:
            lines.append(
                f"  {len(self.invalid_rows)} rows have a label that is not 0 or 1 "
                f"(lines {_lines(self.invalid_rows)}); they were left out"
            )
        if self.conflicting_studies:
            lines.append(
                f"  {len(self.conflicting_studies)} studies have conflicting labels and got "
                f"none (study keys {', '.join(self.conflicting_studies[:10])}"
                + (", ..." if len(self.conflicting_studies) > 10 else "")
                + "): correct the file so each study has one value"
            )
        return "\n".join(lines)


def _lines(rows: tuple[int, ...], limit: int = 10) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (", ..." if len(rows) > limit else "")


def _read_csv(csv_path: Path) -> tuple[bytes, list[str], list[list[str]]]:
    try:
        raw = Path(csv_path).read_bytes()
        text = raw.decode("utf-8-sig")
        reader = csv.reader(text.splitlines())
        header = [h.strip() for h in next(reader, [])]
        rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(
            f"The labels file {Path(csv_path).name} cannot be read ({type(exc).__name__}); "
            "check that it exists and is a UTF-8 CSV file.",
            code="data.labels",
        ) from exc
    return raw, header, rows


def _key_columns(header: list[str], key: str | None, csv_name: str) -> list[tuple[str, int]]:
    """(canonical name, column index) of the identifier columns to use, most specific first."""
    found: dict[str, int] = {}
    for i, name in enumerate(header):
        for canonical, aliases in _ALIASES.items():
            if _norm(name) in aliases and canonical not in found:
                found[canonical] = i
    shown = ", ".join(header) or "none"
    if key is not None:
        wanted = next((c for c, a in _ALIASES.items() if _norm(key) in a), None)
        if wanted is None:
            raise DataError(
                f"Unknown key {key!r}: use one of {', '.join(KEY_COLUMNS)}.",
                code="data.labels",
            )
        if wanted not in found:
            raise DataError(
                f"The labels file {csv_name} has no {wanted} column (found: {shown}).",
                code="data.labels",
                header=header,
            )
        return [(wanted, found[wanted])]
    if not found:
        raise DataError(
            f"The labels file {csv_name} has no column that identifies the images; it needs "
            f"one of {', '.join(KEY_COLUMNS)} (found: {shown}).",
            code="data.labels",
            header=header,
        )
    return [(c, found[c]) for c in KEY_COLUMNS if c in found]


def _label_index(header: list[str], label_column: str, csv_name: str) -> int:
    for i, name in enumerate(header):
        if name.lower() == label_column.strip().lower():
            return i
    raise DataError(
        f"The labels file {csv_name} has no '{label_column}' column (found: "
        f"{', '.join(header) or 'none'}); name the label column with --label-column.",
        code="data.labels",
        header=header,
    )


class _Matcher:
    """Identifier value -> study UIDs, through the index (pseudonyms for people's IDs)."""

    def __init__(self, index: SiteIndex) -> None:
        self.index = index
        by_patient: dict[str, list[str]] = {}
        by_accession: dict[str, list[str]] = {}
        self.study_uids: set[str] = set()
        for row in index.db.query("select study_uid, patient_key, accession_key from studies"):
            self.study_uids.add(row["study_uid"])
            by_patient.setdefault(row["patient_key"], []).append(row["study_uid"])
            if row["accession_key"]:
                by_accession.setdefault(row["accession_key"], []).append(row["study_uid"])
        self.by_patient, self.by_accession = by_patient, by_accession
        self.by_sop = {
            r["sop_uid"]: r["study_uid"]
            for r in index.db.query("select sop_uid, study_uid from instances")
        }

    def __call__(self, column: str, value: str) -> list[str]:
        if column == "StudyInstanceUID":
            return [value] if value in self.study_uids else []
        if column == "SOPInstanceUID":
            study = self.by_sop.get(value)
            return [study] if study else []
        if column == "AccessionNumber":
            return self.by_accession.get(self.index.pseudonym(value, "accession"), [])
        return self.by_patient.get(self.index.pseudonym(value, "patient"), [])


def attach_labels(
    index: SiteIndex,
    csv_path: Path,
    *,
    label_column: str = "label",
    key: str | None = None,
) -> LabelReport:
    """Read ``csv_path`` and store its ``label_column`` on the indexed studies it names.

    Replaces the previous load of ``label_column`` in one transaction. Raises
    :class:`DataError` (``data.labels``) only for a file that cannot be read or has no usable
    key or label column; every row-level problem goes to the :class:`LabelReport`.
    """
    csv_path = Path(csv_path)
    raw, header, rows = _read_csv(csv_path)
    keys = _key_columns(header, key, csv_path.name)
    label_at = _label_index(header, label_column, csv_path.name)
    source = hashlib.sha256(raw).hexdigest()[:16]
    match = _Matcher(index)

    values: dict[str, dict[float, str]] = {}  # study -> parsed value -> raw value (first seen)
    unmatched: list[int] = []
    invalid: list[int] = []
    n_rows = 0
    for line, row in enumerate(rows, start=2):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue  # blank line
        n_rows += 1
        raw_value = cells[label_at] if label_at < len(cells) else ""
        parsed = binary_value(raw_value)
        if parsed is None:
            invalid.append(line)
            continue
        studies: list[str] = []
        for column, at in keys:
            ident = cells[at] if at < len(cells) else ""
            if ident:
                studies = match(column, ident)
                break
        if not studies:
            unmatched.append(line)
            continue
        for study in studies:
            values.setdefault(study, {}).setdefault(parsed, raw_value)

    labelled = {s: next(iter(v.values())) for s, v in values.items() if len(v) == 1}
    conflicting = sorted(study_key(index, s) for s, v in values.items() if len(v) > 1)
    _store(index, label_column, labelled.items(), source)
    total_studies = len(match.study_uids)
    return LabelReport(
        label_column=label_column,
        key_columns=tuple(c for c, _ in keys),
        source=source,
        rows=n_rows,
        matched_rows=n_rows - len(unmatched) - len(invalid),
        unmatched_rows=tuple(unmatched),
        invalid_rows=tuple(invalid),
        labelled_studies=len(labelled),
        unlabelled_studies=total_studies - len(labelled),
        conflicting_studies=tuple(conflicting),
    )


def _store(
    index: SiteIndex, label_column: str, labelled: Iterable[tuple[str, str]], source: str
) -> None:
    ensure_labels_table(index)
    rows = [
        {"study_uid": s, "label_name": label_column, "value": v, "source": source}
        for s, v in labelled
    ]
    with index.transaction():
        index.db.execute(f"delete from {LABELS_TABLE} where label_name = ?", [label_column])
        if rows:
            index.table(LABELS_TABLE).insert_all(rows, pk=("study_uid", "label_name"))


def study_labels(index: SiteIndex, label_column: str = "label") -> dict[str, str]:
    """Study UID -> raw label value for ``label_column`` (empty before any load)."""
    if LABELS_TABLE not in index.db.table_names():
        return {}
    return {
        r["study_uid"]: r["value"]
        for r in index.db.query(
            f"select study_uid, value from {LABELS_TABLE} where label_name = ?", [label_column]
        )
    }
