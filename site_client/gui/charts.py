"""Bar charts of counts (the data summary, the scanner fingerprint), drawn with pyqtgraph.

pyqtgraph is the app's one chart library (QtCharts is not in pyside6-essentials; matplotlib
is for static report figures): pure Python over numpy, fast enough for live charts, and
drawn with Qt, so a chart follows the high-DPI scale and renders offscreen for screenshots.
Bars are horizontal so that long category names (scanner models) stay readable.
"""

from __future__ import annotations

import os

os.environ.setdefault("PYQTGRAPH_QT_LIB", "PySide6")

import pyqtgraph as pg  # after choosing the binding above
from PySide6.QtGui import QFontMetrics, QPalette
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from site_client.core.intake.summary import Counts
from site_client.core.site_data import top_counts
from site_client.gui.style import ACCENT

__all__ = ["CountsChart"]


class CountsChart(QWidget):
    """A titled horizontal bar chart of ``(category, count)`` pairs, most frequent on top."""

    def __init__(self, title: str, tooltip: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.counts: Counts = ()
        palette = self.palette()
        self.plot = pg.PlotWidget(background=palette.color(QPalette.ColorRole.Base))
        self.plot.setMenuEnabled(False)
        self.plot.setMouseEnabled(x=False, y=False)
        self.plot.hideButtons()
        self.plot.hideAxis("bottom")  # every bar carries its count
        text = palette.color(QPalette.ColorRole.Text)
        axis = self.plot.getAxis("left")
        axis.setTextPen(text)
        axis.setPen(text)
        axis.setStyle(tickLength=0)
        self.title = QLabel(f"<b>{title}</b>")
        self.empty = QLabel("Nothing imported yet.")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.title)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.empty)
        self.setToolTip(tooltip)
        self.setMinimumHeight(160)
        self.set_counts(())

    def set_counts(self, counts: Counts, limit: int = 8) -> None:
        shown = top_counts(tuple(counts), limit) if counts else ()
        self.counts = shown
        self.plot.clear()
        self.empty.setVisible(not shown)
        self.plot.setVisible(bool(shown))
        if not shown:
            return
        n = len(shown)
        ys = [n - 1 - i for i in range(n)]  # the largest at the top
        values = [count for _, count in shown]
        bars = pg.BarGraphItem(
            x0=0, y=ys, width=values, height=0.6, brush=ACCENT, pen=pg.mkPen(None)
        )
        self.plot.addItem(bars)
        for y, value in zip(ys, values, strict=True):
            label = pg.TextItem(
                str(value), anchor=(0, 0.5), color=self.palette().color(QPalette.ColorRole.Text)
            )
            label.setPos(value, y)
            self.plot.addItem(label)
        axis = self.plot.getAxis("left")
        axis.setTicks([[(y, name) for y, (name, _) in zip(ys, shown, strict=True)]])
        metrics = QFontMetrics(axis.style.get("tickFont") or self.font())
        axis.setWidth(max(metrics.horizontalAdvance(name) for name, _ in shown) + 14)
        self.plot.setYRange(-0.6, n - 0.4, padding=0)
        self.plot.setXRange(0, max(values) * 1.15, padding=0)
