"""The study list the site app shows: one row per indexed study, and the filter over it.

A view model in plain Python (napari's pattern): the app's table binds to these rows and the
filter rule lives here, not in a slot, so it is tested without Qt. A row holds what staff
need to find and check a study (modality, body part, scanner, counts, image size, label)
and names it by the same short pseudonymous key as the labels report
(:func:`site_client.core.intake.labels.study_key`), so a study the report calls conflicting
can be found in the table. Nothing here identifies a patient; the path of one image is
kept for the preview and never shown.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from site_client.core.intake.index import SiteIndex
from site_client.core.intake.labels import LABELS_TABLE, study_key

__all__ = ["NO_LABEL", "LabelChoice", "StudyFilter", "StudyRow", "list_studies"]

NO_LABEL = "(no label)"


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyRow:
    study_uid: str
    key: str  # short pseudonymous key, as in the labels report
    modality: str
    body_part: str
    scanner: str  # "Manufacturer Model"
    series: int
    images: int
    rows: int
    columns: int
    label: str  # the raw label value, "" when the study has none
    preview_path: str  # one image of the study (first series, first instance)

    @property
    def image_size(self) -> str:
        return f"{self.rows} x {self.columns}" if self.rows and self.columns else ""

    @property
    def label_text(self) -> str:
        return self.label or NO_LABEL

    def texts(self) -> tuple[str, ...]:
        """What the table shows, in column order (the filter searches these)."""
        return (
            self.key,
            self.modality,
            self.body_part,
            self.scanner,
            str(self.series),
            str(self.images),
            self.image_size,
            self.label_text,
        )


class LabelChoice(Enum):
    ANY = "any"
    POSITIVE = "1"
    NEGATIVE = "0"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class StudyFilter:
    """Keep rows whose shown text contains every word of ``text`` (case ignored) and whose
    label is ``label``."""

    text: str = ""
    label: LabelChoice = LabelChoice.ANY

    def accepts(self, row: StudyRow) -> bool:
        if self.label is LabelChoice.NONE and row.label:
            return False
        if self.label in (LabelChoice.POSITIVE, LabelChoice.NEGATIVE) and (
            _number(row.label) != float(self.label.value)
        ):
            return False
        words = self.text.casefold().split()
        if not words:
            return True
        haystack = " ".join(row.texts()).casefold()
        return all(word in haystack for word in words)


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def list_studies(index: SiteIndex, label_column: str = "label") -> tuple[StudyRow, ...]:
    """Every study with at least one indexed image, ordered by its key."""
    labels: dict[str, str] = {}
    if LABELS_TABLE in index.db.table_names():
        labels = {
            uid: value
            for uid, value in index.db.execute(
                f"select study_uid, value from {LABELS_TABLE} where label_name = ?",
                [label_column],
            )
        }
    kinds: dict[str, tuple[set[str], set[str], set[str]]] = {}
    for uid, modality, body_part, scanner in index.db.execute(
        "select distinct study_uid, modality, body_part, trim(coalesce(manufacturer, '') || "
        "' ' || coalesce(model, '')) from instances"
    ):
        sets = kinds.setdefault(uid, (set(), set(), set()))
        for values, value in zip(sets, (modality, body_part, scanner), strict=True):
            if value:
                values.add(str(value))
    query = (
        "select study_uid, count(*), count(distinct series_uid), max(rows), max(columns), "
        "min(series_uid || char(1) || sop_uid || char(1) || path) "
        "from instances group by study_uid"
    )
    rows = []
    for uid, images, series, n_rows, n_cols, first in index.db.execute(query):
        modality, body_part, scanner = kinds.get(uid, (set(), set(), set()))
        rows.append(
            StudyRow(
                study_uid=uid,
                key=study_key(index, uid),
                modality=_joined(modality),
                body_part=_joined(body_part),
                scanner=_joined(scanner),
                series=int(series),
                images=int(images),
                rows=int(n_rows or 0),
                columns=int(n_cols or 0),
                label=labels.get(uid, ""),
                preview_path=first.split("\x01", 2)[2],
            )
        )
    return tuple(sorted(rows, key=lambda r: r.key))


def _joined(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))
