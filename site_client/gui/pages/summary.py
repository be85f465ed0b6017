"""The Data page's summary: totals and the scanner fingerprint as bar charts (counts only).

What the charts show is ``site_client.core.intake.summary.DataSummary``: the same counts the
site may choose to share with the coordinator, so staff see exactly what would leave the
hospital if they allow it (no identifier of any kind is in it).
"""

from __future__ import annotations

from html import escape

from PySide6.QtWidgets import QGridLayout, QLabel, QScrollArea, QVBoxLayout, QWidget

from site_client.core.intake.summary import DataSummary
from site_client.gui.charts import CountsChart

__all__ = ["SummaryPanel"]

CHARTS = (
    ("by_scanner", "Scanners", "Images by manufacturer and model of the scanner."),
    ("by_modality", "Kinds of image", "Images by modality (DX, CR, CT, MR...)."),
    ("by_image_size", "Image sizes", "Images by rows x columns, in pixels."),
    ("by_pixel_spacing", "Pixel spacing", "Images by the size of one pixel, in millimetres."),
    ("by_bits_stored", "Bits stored", "Images by the number of bits per pixel value."),
    (
        "by_photometric",
        "Photometric interpretation",
        "MONOCHROME2: bright means dense. MONOCHROME1: the other way round (Tessera flips it).",
    ),
)


class SummaryPanel(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.totals = QLabel()
        self.totals.setWordWrap(True)
        self.explain = QLabel(
            "This is the site's <i>scanner fingerprint</i>: counts only, no names, IDs or "
            "dates. It explains why this site's images may look different from other sites'."
        )
        self.explain.setWordWrap(True)
        self.charts: dict[str, CountsChart] = {}
        grid_widget = QWidget()
        grid = QGridLayout(grid_widget)
        for i, (key, title, tip) in enumerate(CHARTS):
            chart = CountsChart(title, tip)
            self.charts[key] = chart
            grid.addWidget(chart, i // 2, i % 2)
        self.label_chart = CountsChart("Labels", "Images by label value, from the labels file.")
        self.charts["by_label"] = self.label_chart
        grid.addWidget(self.label_chart, len(CHARTS) // 2, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(grid_widget)
        layout = QVBoxLayout(self)
        layout.addWidget(self.totals)
        layout.addWidget(self.explain)
        layout.addWidget(scroll, 1)
        self.summary: DataSummary | None = None

    def set_summary(self, summary: DataSummary) -> None:
        self.summary = summary
        self.totals.setText(
            f"<b>{summary.images}</b> images of <b>{summary.patients}</b> patients "
            f"({summary.studies} studies, {summary.series} series); "
            f"<b>{summary.rejected_files}</b> files could not be used."
        )
        for key, _, _ in CHARTS:
            self.charts[key].set_counts(getattr(summary, key))
        if summary.by_label:
            name, counts = summary.by_label[0]
            self.label_chart.title.setText(f"<b>Labels ('{escape(name)}')</b>")
            self.label_chart.set_counts(counts)
        else:
            self.label_chart.title.setText("<b>Labels</b>")
            self.label_chart.set_counts(())
