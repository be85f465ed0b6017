"""The site app's data services over a real index and real synthetic DICOM files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from shared.errors import DataError
from shared.synthetic import generate_federation
from site_client.core.config import SiteDir
from site_client.core.intake.importer import ImportProgress
from site_client.core.site_data import (
    import_into_site,
    load_data_view,
    load_labels,
    progress_text,
    top_counts,
)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fed")
    return generate_federation(root, sites=1, images_per_site=12, test_images=0, image_size=32)


def test_import_labels_and_view(federation, tmp_path: Path) -> None:
    site = federation.sites[0]
    folder = tmp_path / "export"
    shutil.copytree(site.dicom_dir, folder)
    (folder / "notes.txt").write_text("not an image")
    site_dir = SiteDir(tmp_path / "site")
    seen: list[ImportProgress] = []
    report = import_into_site(site_dir, folder, progress=seen.append, batch_size=5)
    assert (report.indexed, report.rejected, report.cancelled) == (12, 1, False)
    assert [p.files_seen for p in seen] == [0, 5, 10, 13]  # listed, then each batch, then done
    labels = load_labels(site_dir, site.labels_csv, " label ")
    assert labels.ok and labels.labelled_studies == 12

    view = load_data_view(site_dir)
    assert len(view.studies) == 12 and view.summary.images == 12
    assert all(r.label in ("0", "1") for r in view.studies)
    assert [(r.code, Path(r.path).name) for r in view.rejections] == [
        ("data.not_dicom", "notes.txt")
    ]
    assert view.last_import is not None and view.last_import.status == "done"
    assert view.last_import.summary() == (
        f"The last import ({folder}) finished: 12 files indexed, 0 unchanged, 1 not usable."
    )


def test_a_cancelled_import_keeps_what_it_wrote(federation, tmp_path: Path) -> None:
    site_dir = SiteDir(tmp_path / "site")
    asked = iter(range(100))
    report = import_into_site(
        site_dir, federation.sites[0].dicom_dir, should_stop=lambda: next(asked) >= 6, batch_size=3
    )
    assert report.cancelled and report.indexed == 6
    view = load_data_view(site_dir)
    assert len(view.studies) == 6
    assert view.last_import is not None and "was cancelled" in view.last_import.summary()


def test_the_view_of_an_empty_site(tmp_path: Path) -> None:
    view = load_data_view(SiteDir(tmp_path / "site"))
    assert (view.studies, view.rejections, view.last_import) == ((), (), None)
    assert view.summary.images == 0


def test_a_labels_file_without_a_key_column_is_a_data_error(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("name,label\nx,1\n")
    with pytest.raises(DataError, match="no column that identifies the images") as info:
        load_labels(SiteDir(tmp_path / "site"), csv)
    assert info.value.code == "data.labels"


def test_a_missing_folder_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist or is not a folder") as info:
        import_into_site(SiteDir(tmp_path / "site"), tmp_path / "nowhere")
    assert info.value.code == "data.folder_not_found"


def test_progress_text() -> None:
    assert progress_text(ImportProgress(0, 0, 0, 0, 0)) == "Listing the folder..."
    assert progress_text(ImportProgress(40, 150, 38, 0, 2)) == (
        "40 of 150 files: 38 indexed, 2 not usable"
    )
    assert progress_text(ImportProgress(40, 150, 30, 8, 2)) == (
        "40 of 150 files: 30 indexed, 8 unchanged, 2 not usable"
    )


def test_top_counts_folds_the_tail_into_one_bar() -> None:
    counts = tuple((f"s{i}", 10 - i) for i in range(10))
    assert top_counts(counts, limit=10) == counts
    folded = top_counts(counts, limit=4)
    assert folded == (("s0", 10), ("s1", 9), ("s2", 8), ("others (7)", sum(range(1, 8))))
    assert sum(n for _, n in folded) == sum(n for _, n in counts)
    with pytest.raises(ValueError, match="at least two"):
        top_counts(counts, limit=1)
