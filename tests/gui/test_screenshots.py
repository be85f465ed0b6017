"""``tessera-site gui --screenshots DIR``: every page so far, rendered with demo data."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtGui import QColor, QImage

from site_client.cli import main
from site_client.gui.pages.participation import SECOND_SERIES
from site_client.gui.style import ACCENT, OK, WAITING


def distinct_colours(image: QImage, step: int = 4) -> int:
    """Colours on a grid of pixels: 1 for a blank image, dozens for a rendered page."""
    return len(
        {
            image.pixel(x, y)
            for x in range(0, image.width(), step)
            for y in range(0, image.height(), step)
        }
    )


def test_the_blank_check_can_fail() -> None:
    blank = QImage(40, 30, QImage.Format.Format_RGB32)
    blank.fill(0xFFEEEEEE)
    assert distinct_colours(blank) == 1


def test_screenshots_of_every_page_with_data(qapp, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shots"
    assert main(["gui", "--screenshots", str(out)]) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [
        "01-setup-data-folder.png",
        "02-setup-invitation.png",
        "03-data-import-and-labels.png",
        "04-data-studies.png",
        "05-data-summary.png",
        "06-data-pacs-receiver.png",
        "07-governance-charter.png",
        "08-governance-plans.png",
        "09-governance-policy.png",
        "10-participation.png",
        "11-models-card.png",
        "12-models-predictions.png",
        "13-activity.png",
        "14-this-site.png",
    ]
    assert capsys.readouterr().out.split() == [str(f) for f in files]
    for f in files:
        image = QImage(str(f))
        assert not image.isNull() and image.width() >= 700 and image.height() >= 500, f.name
        assert distinct_colours(image) > 20, f"{f.name} looks blank"
    # the summary page carries the charts' accent colour: the demo data was drawn
    summary = QImage(str(out / "05-data-summary.png"))
    accent = QColor(ACCENT).rgb()
    assert any(
        summary.pixel(x, y) == accent
        for x in range(0, summary.width(), 3)
        for y in range(0, summary.height(), 3)
    )
    # the plans page shows one plan approved (green) and one waiting (amber): the demo
    # decisions went through the Governance page
    plans = QImage(str(out / "08-governance-plans.png"))
    colours = {
        plans.pixel(x, y) for x in range(0, plans.width(), 2) for y in range(0, plans.height(), 2)
    }
    assert QColor(OK).rgb() in colours and QColor(WAITING).rgb() in colours
    # the participation page draws the recorded run's rounds: both series' colours appear
    participation = QImage(str(out / "10-participation.png"))
    colours = {
        participation.pixel(x, y)
        for x in range(0, participation.width(), 2)
        for y in range(0, participation.height(), 2)
    }
    assert accent in colours and QColor(SECOND_SERIES).rgb() in colours
