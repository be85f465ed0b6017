"""The site's data summary: what kinds of images it holds, as counts only.

This is the "scanner fingerprint" of a site: images by modality, by manufacturer and model,
by label, by image size, pixel spacing, bits stored and photometric interpretation. It holds
no identifier of any kind (no UID, path, pseudonym or date), so it can be shown in the app
and, where the site allows it, sent to the coordinator to explain why sites differ.

Counts are of indexed images (instances); patients, studies and series are totals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from site_client.core.intake.index import SiteIndex

__all__ = ["DataSummary", "data_summary"]

UNKNOWN = "(not given)"
UNLABELLED = "(no label)"

Counts = tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DataSummary:
    images: int
    patients: int
    studies: int
    series: int
    rejected_files: int
    by_modality: Counts = field(default=())
    by_scanner: Counts = field(default=())  # "Manufacturer Model"
    by_label: tuple[tuple[str, Counts], ...] = field(default=())  # label name -> value counts
    by_image_size: Counts = field(default=())  # "rows x columns"
    by_pixel_spacing: Counts = field(default=())  # "row x column mm"
    by_bits_stored: Counts = field(default=())
    by_photometric: Counts = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, in a deterministic order (most frequent first, then by name)."""
        return {
            "images": self.images,
            "patients": self.patients,
            "studies": self.studies,
            "series": self.series,
            "rejected_files": self.rejected_files,
            "by_modality": dict(self.by_modality),
            "by_scanner": dict(self.by_scanner),
            "by_label": {name: dict(values) for name, values in self.by_label},
            "by_image_size": dict(self.by_image_size),
            "by_pixel_spacing": dict(self.by_pixel_spacing),
            "by_bits_stored": dict(self.by_bits_stored),
            "by_photometric": dict(self.by_photometric),
        }

    def summary(self) -> str:
        """Plain-language lines for the command line."""
        lines = [
            f"{self.images} images of {self.patients} patients "
            f"({self.studies} studies, {self.series} series); "
            f"{self.rejected_files} files not usable."
        ]
        sections: list[tuple[str, Counts]] = [
            ("modality", self.by_modality),
            ("scanner", self.by_scanner),
            ("image size", self.by_image_size),
            ("pixel spacing", self.by_pixel_spacing),
            ("bits stored", self.by_bits_stored),
            ("photometric", self.by_photometric),
        ]
        sections += [(f"label '{name}'", values) for name, values in self.by_label]
        for title, counts in sections:
            if counts:
                shown = ", ".join(f"{key}: {n}" for key, n in counts)
                lines.append(f"  by {title}: {shown}")
        return "\n".join(lines)


def data_summary(index: SiteIndex) -> DataSummary:
    """Count the index's images along the scanner-fingerprint dimensions."""
    q = index.db.execute

    def grouped(expr: str) -> Counts:
        rows = q(f"select {expr}, count(*) from instances group by 1").fetchall()
        return _ordered((_name(key), n) for key, n in rows)

    return DataSummary(
        images=q("select count(*) from instances").fetchone()[0],
        patients=q("select count(distinct patient_key) from instances").fetchone()[0],
        studies=q("select count(distinct study_uid) from instances").fetchone()[0],
        series=q("select count(distinct series_uid) from instances").fetchone()[0],
        rejected_files=q("select count(*) from rejections").fetchone()[0],
        by_modality=grouped("modality"),
        by_scanner=grouped("trim(coalesce(manufacturer, '') || ' ' || coalesce(model, ''))"),
        by_label=_labels(index),
        by_image_size=_ordered(
            (f"{r} x {c}" if r and c else UNKNOWN, n)
            for r, c, n in q(
                "select rows, columns, count(*) from instances group by 1, 2"
            ).fetchall()
        ),
        by_pixel_spacing=_ordered(
            (_spacing(s), n)
            for s, n in q("select pixel_spacing, count(*) from instances group by 1").fetchall()
        ),
        by_bits_stored=_ordered(
            (str(b) if b else UNKNOWN, n)
            for b, n in q("select bits_stored, count(*) from instances group by 1").fetchall()
        ),
        by_photometric=grouped("photometric"),
    )


def _labels(index: SiteIndex) -> tuple[tuple[str, Counts], ...]:
    """Images per label value, per label name; images of studies without that label are
    counted as unlabelled. Empty when no labels were loaded (the table may not exist yet)."""
    if "labels" not in index.db.table_names():
        return ()
    columns = {c.name for c in index.table("labels").columns}
    if not {"study_uid", "label_name", "value"} <= columns:
        return ()
    q = index.db.execute
    names = [r[0] for r in q("select distinct label_name from labels order by 1").fetchall()]
    result = []
    for name in names:
        rows = q(
            "select l.value, count(*) from instances i left join labels l "
            "on l.study_uid = i.study_uid and l.label_name = ? group by 1",
            [name],
        ).fetchall()
        result.append(
            (
                str(name),
                _ordered((UNLABELLED if v is None else (str(v) or UNLABELLED), n) for v, n in rows),
            )
        )
    return tuple(result)


def _name(value: object) -> str:
    text = "" if value is None else str(value).strip()
    return text or UNKNOWN


def _spacing(value: str | None) -> str:
    """ "0.30\\0.30" -> "0.3 x 0.3 mm" (numbers normalised, so equal spacings count once)."""
    if not value:
        return UNKNOWN
    try:
        parts = [f"{float(p):g}" for p in value.split("\\")]
    except ValueError:
        return UNKNOWN
    return " x ".join(parts) + " mm"


def _ordered(pairs: Any) -> Counts:
    """Merge equal keys, then most frequent first, ties by name."""
    merged: dict[str, int] = {}
    for key, n in pairs:
        merged[key] = merged.get(key, 0) + int(n)
    return tuple(sorted(merged.items(), key=lambda kv: (-kv[1], kv[0])))
