"""The app's few visual constants: one accent colour and the state colours.

Native widgets and the OS theme do the rest (STYLE.md, "Site app"); colours are used for
meaning only: the accent for charts and the one primary action, the state colours for the
status bar's connection dot and for messages that are fine, need a look, or went wrong.
"""

from __future__ import annotations

from html import escape

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QPainter, QPixmap
from PySide6.QtWidgets import QLabel

ACCENT = "#2c6fbb"  # one accent colour (a calm blue, readable on light and dark themes)
OK = "#2e7d32"  # connected, finished, nothing to fix
WAITING = "#8a6d00"  # waiting, needs a look (amber, dark enough for text on white)
ERROR = "#c62828"  # failed, refused, cannot be used
IDLE = "#757575"  # not connected, nothing running


def dot(colour: str, size: int = 12) -> QPixmap:
    """A filled circle for status labels (drawn, so it stays crisp on high-DPI screens)."""
    ratio = 2.0
    pixmap = QPixmap(int(size * ratio), int(size * ratio))
    pixmap.setDevicePixelRatio(ratio)
    pixmap.fill(QColor(0, 0, 0, 0))
    painter = QPainter(pixmap)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setBrush(QColor(colour))
    painter.setPen(QColor(colour))
    painter.drawEllipse(1, 1, size - 2, size - 2)
    painter.end()
    return pixmap


def set_message(label: QLabel, text: str, colour: str | None = None, *, headline: str = "") -> None:
    """Show ``text`` (plain, line breaks kept) under an optional bold ``headline``, coloured
    by meaning (``None``: the theme's text colour).

    Both are escaped: messages carry names and text from elsewhere (a federation's name, a
    coordinator's error message, a file name), which must never be read as markup.
    """
    parts = [f"<b>{escape(headline, quote=False)}</b>"] if headline else []
    if text:
        parts.append(escape(text, quote=False).replace("\n", "<br>"))
    label.setTextFormat(Qt.TextFormat.RichText)
    label.setText("<br>".join(parts))
    label.setStyleSheet(f"color: {colour};" if colour else "")
