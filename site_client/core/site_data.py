"""The site app's data services: what the Data page asks of the study index, as blocking calls.

Each function opens the site's index, does one job and closes it, so the app's task runner
can call it from any worker thread (a SQLite connection belongs to the thread that uses it)
and two of them never share a connection. The Data page shows what they return and holds no
rule of its own: the import and the labels follow ``intake.importer`` and ``intake.labels``,
the snapshot (:class:`DataView`) bundles the study list, the summary (counts only), the files
that could not be used and the last import, read in one go after every change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from site_client.core.config import SiteDir
from site_client.core.intake.importer import ImportProgress, ImportReport, import_folder
from site_client.core.intake.index import Rejection
from site_client.core.intake.labels import LabelReport, attach_labels
from site_client.core.intake.summary import Counts, DataSummary, data_summary
from site_client.core.studies import StudyRow, list_studies

__all__ = [
    "DataView",
    "LastImport",
    "import_into_site",
    "load_data_view",
    "load_labels",
    "progress_text",
    "top_counts",
]

#: Files per index transaction in the app: small enough that progress moves smoothly and a
#: cancel takes effect at once, large enough that SQLite is not the bottleneck.
APP_BATCH_SIZE = 25


@dataclass(frozen=True, slots=True, kw_only=True)
class LastImport:
    root: str
    status: str  # done, cancelled, interrupted, running
    started_at: float
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        c = self.counts
        what = {"done": "finished", "cancelled": "was cancelled"}.get(self.status, self.status)
        return (
            f"The last import ({self.root}) {what}: {c.get('indexed', 0)} files indexed, "
            f"{c.get('unchanged', 0)} unchanged, {c.get('rejected', 0)} not usable."
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DataView:
    """Everything the Data page shows, read from the index at one moment."""

    studies: tuple[StudyRow, ...]
    summary: DataSummary
    rejections: tuple[Rejection, ...]
    last_import: LastImport | None


def load_data_view(site_dir: SiteDir, label_column: str = "label") -> DataView:
    index = site_dir.open_index()
    try:
        last = index.db.execute(
            "select root, status, started_at, counts from import_runs "
            "order by started_at desc limit 1"
        ).fetchone()
        return DataView(
            studies=list_studies(index, label_column),
            summary=data_summary(index),
            rejections=tuple(index.rejections()),
            last_import=None
            if last is None
            else LastImport(
                root=str(last[0]),
                status=str(last[1]),
                started_at=float(last[2]),
                counts=json.loads(last[3] or "{}"),
            ),
        )
    finally:
        index.close()


def import_into_site(
    site_dir: SiteDir,
    folder: str | os.PathLike[str],
    *,
    progress: Callable[[ImportProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    batch_size: int = APP_BATCH_SIZE,
) -> ImportReport:
    """Import ``folder`` into the site's index (see ``intake.importer.import_folder``)."""
    index = site_dir.open_index()
    try:
        return import_folder(
            index, folder, progress=progress, should_stop=should_stop, batch_size=batch_size
        )
    finally:
        index.close()


def load_labels(site_dir: SiteDir, csv_path: Path, label_column: str = "label") -> LabelReport:
    """Attach a labels CSV to the indexed studies and return its validation report."""
    index = site_dir.open_index()
    try:
        return attach_labels(index, Path(csv_path), label_column=label_column.strip() or "label")
    finally:
        index.close()


def progress_text(p: ImportProgress) -> str:
    """One plain line for a progress bar: "40 of 150 files: 38 indexed, 2 not usable"."""
    if p.files_total == 0 and p.files_seen == 0:
        return "Listing the folder..."
    parts = [f"{p.indexed} indexed"]
    if p.unchanged:
        parts.append(f"{p.unchanged} unchanged")
    parts.append(f"{p.rejected} not usable")
    return f"{p.files_seen} of {p.files_total} files: {', '.join(parts)}"


def top_counts(counts: Counts, limit: int = 8, other: str = "others") -> Counts:
    """The ``limit - 1`` largest categories and one ``other`` bar for the rest, so a chart
    stays readable however many scanners or sizes a site has."""
    if limit < 2:
        raise ValueError("keep at least two categories")
    if len(counts) <= limit:
        return tuple(counts)
    ordered = sorted(counts, key=lambda kv: (-kv[1], kv[0]))
    head = ordered[: limit - 1]
    rest = sum(n for _, n in ordered[limit - 1 :])
    return (*head, (f"{other} ({len(ordered) - limit + 1})", rest))
