"""The app's image preview: one frame at screen size, windowed in the file's units."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from shared.errors import DataError
from shared.synthetic import generate_federation
from site_client.core.preview import load_preview, render, shrink


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("preview")
    fed = generate_federation(root, sites=2, images_per_site=1, test_images=0, image_size=64)
    return [next(site.dicom_dir.rglob("*.dcm")) for site in fed.sites]


def test_shrink_averages_whole_blocks() -> None:
    frame = np.arange(36, dtype=np.float32).reshape(6, 6)
    small = shrink(frame, max_side=3)
    assert small.shape == (3, 3)
    assert small[0, 0] == pytest.approx(np.mean([0, 1, 6, 7]))
    assert np.array_equal(shrink(frame, max_side=6), frame)  # small enough already
    assert shrink(np.ones((1, 40)), max_side=8).shape == (1, 8)  # a sliver is sampled


def test_the_default_window_is_the_files_own(images: list[Path]) -> None:
    ds = pydicom.dcmread(images[0])
    preview = load_preview(images[0], max_side=32)
    assert preview.values.shape == (32, 32)
    assert (preview.rows, preview.columns, preview.frames) == (64, 64, 1)
    assert preview.default_center == pytest.approx(float(ds.WindowCenter))
    assert preview.default_width == pytest.approx(float(ds.WindowWidth))


def test_the_window_maps_values_to_grey(images: list[Path]) -> None:
    for path in images:  # one MONOCHROME2 site and one MONOCHROME1 site
        preview = load_preview(path)
        lo, hi = preview.value_min, preview.value_max
        full = render(preview, (lo + hi) / 2, hi - lo + 1)
        assert full.dtype == np.uint8 and full.shape == preview.values.shape
        assert full.max() > full.min()  # a real picture
        narrow = render(preview, (lo + hi) / 2, max((hi - lo) / 10, 1))
        saturated = lambda img: np.mean((img == 0) | (img == 255))  # noqa: E731
        assert saturated(narrow) > saturated(full)  # more contrast, more black and white
    # bright means dense on screen whatever the photometric interpretation
    means = []
    for path in images:
        preview = load_preview(path)
        img = render(preview, preview.default_center, preview.default_width).astype(float)
        centre, edge = img[24:40, 24:40].mean(), np.r_[img[:4].ravel(), img[-4:].ravel()].mean()
        means.append(centre > edge)
    photometric = {pydicom.dcmread(p).PhotometricInterpretation for p in images}
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    assert means[0] == means[1]


def test_a_vanished_file_and_a_bad_window_are_data_errors(
    images: list[Path], tmp_path: Path
) -> None:
    with pytest.raises(DataError, match="cannot be read any more") as info:
        load_preview(tmp_path / "gone.dcm")
    assert info.value.code == "data.unreadable"
    preview = load_preview(images[0])
    with pytest.raises(DataError, match="width must be at least 1") as info:
        render(preview, 100.0, 0.5)
    assert info.value.code == "data.window"
