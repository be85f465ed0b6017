"""An image preview for the site app: one frame at screen size, windowed on demand.

Theory of operation: :func:`load_preview` does the slow part once, off the GUI thread: read the
file, decode one frame through the same path as training (``shared.dicom_pixels``: modality
LUT, MONOCHROME1 inverted so bright means dense) and shrink it by block averaging to at most
``max_side`` pixels, which is all a preview pane can show. :func:`render` is then cheap enough
to run on every move of the window controls: a LINEAR window (PS3.3 C.11.2.1.2) through
``shared.dicom_pixels.apply_window``, so the centre and width are in the file's modality
units (Hounsfield units for CT) exactly as a PACS viewer shows them, MONOCHROME1 included.

The default window is the file's own first Window Center/Width when it has one, else the
frame's value range. Pixels stay on this machine; nothing here is sent anywhere.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom

from shared.dicom_pixels import apply_window, decode_frames, number_of_frames
from shared.errors import DataError

__all__ = ["PreviewImage", "load_preview", "render"]

MAX_SIDE = 512


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class PreviewImage:
    values: np.ndarray  # (rows, cols) float32, modality units, bright = dense
    dataset: Any = field(repr=False)  # the pydicom Dataset (the window needs its description)
    rows: int  # of the stored image, before shrinking
    columns: int
    frames: int
    modality: str
    photometric: str
    default_center: float
    default_width: float
    value_min: float
    value_max: float


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        if not value:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def shrink(frame: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """Block-average ``frame`` by the smallest whole factor that fits ``max_side``."""
    factor = max(1, math.ceil(max(frame.shape) / max_side))
    if factor == 1:
        return frame.astype(np.float32, copy=False)
    rows, cols = (frame.shape[0] // factor) * factor, (frame.shape[1] // factor) * factor
    if rows == 0 or cols == 0:  # a sliver thinner than the factor: sample it instead
        return frame[::factor, ::factor].astype(np.float32)
    blocks = frame[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor)
    return blocks.mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def load_preview(path: str | os.PathLike[str], max_side: int = MAX_SIDE) -> PreviewImage:
    """The first frame of the image at ``path``, ready to :func:`render`.

    Raises only :class:`DataError`: ``data.unreadable`` when the file cannot be read, or the
    pixel codes of :func:`shared.dicom_pixels.decode_frames`.
    """
    try:
        ds = pydicom.dcmread(os.fspath(path))
    except Exception as exc:  # adapter edge: a file that changed since it was indexed
        raise DataError(
            f"The image file cannot be read any more ({type(exc).__name__}); it may have been "
            "moved or changed since it was imported. Import its folder again.",
            code="data.unreadable",
        ) from exc
    frames = decode_frames(ds, index=0)
    values = shrink(frames[0], max_side)
    lo, hi = float(values.min()), float(values.max())
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None or width < 1:
        center, width = (lo + hi) / 2.0, max(hi - lo, 1.0)
    return PreviewImage(
        values=values,
        dataset=ds,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        frames=number_of_frames(ds),
        modality=str(ds.get("Modality", "") or ""),
        photometric=str(ds.get("PhotometricInterpretation", "") or ""),
        default_center=center,
        default_width=width,
        value_min=lo,
        value_max=hi,
    )


def render(preview: PreviewImage, center: float, width: float) -> np.ndarray:
    """The preview through a LINEAR window, as 8-bit grey ``(rows, cols)`` (255 = bright).

    Raises :class:`DataError` (``data.window``) for a width below 1 or a value that is not a
    finite number.
    """
    windowed = apply_window(
        preview.values[None], preview.dataset, window=(float(center), float(width))
    )
    return np.ascontiguousarray(np.rint(windowed[0] * 255.0).astype(np.uint8))
