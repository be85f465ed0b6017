"""DICOM pixel data to float32 frames in modality units, for training.

Theory of operation: one dataset goes through four fixed steps, and every failure on the way
becomes a :class:`DataError` with one of four stable codes, so an import can report a bad
file instead of crashing on it:

1. **Check the image description** (PS3.3 C.7.6.3): pixel data present, greyscale
   (``MONOCHROME1``/``MONOCHROME2``, one sample per pixel), Rows/Columns/Bits Allocated set.
   Colour images (RGB, YBR_*, PALETTE COLOR) are refused, not converted: in X-ray, CT and MR
   a colour object is a secondary capture (a screenshot, an annotated or fused image, a
   report page), and its luminance carries burned-in text and overlays that a classifier
   would learn as if they were anatomy. Codes ``data.no_pixels`` and
   ``data.unsupported_photometric``.
2. **Decode** through pydicom's pixel decoders (pydicom >= 3, ``pydicom.pixels``) with the
   pylibjpeg plugins: native (implicit/explicit VR, big endian, deflate), JPEG baseline and
   extended (8/12-bit), JPEG lossless, JPEG-LS, JPEG 2000 and HTJ2K, RLE. A transfer syntax
   that pydicom does not know, or whose plugin is not installed, is ``data.transfer_syntax``;
   anything that fails while decoding (truncated, corrupt) is ``data.corrupt_pixels``.
3. **Modality LUT** (PS3.3 C.11.1): the Modality LUT Sequence, else Rescale Slope and
   Intercept, taken per frame from the functional groups of enhanced multi-frame objects
   (PS3.3 C.7.6.16.2.9, Pixel Value Transformation) when the top level has none.
4. **MONOCHROME1 inverted** within the modality value range, ``x' = lo + hi - x``, so that
   bright means dense everywhere (PS3.3 C.7.6.3.1.2) and the values stay in the same range.

:func:`apply_window` then maps those values through the VOI LUT or a window (PS3.3 C.11.2)
to [0, 1], 1 being bright. For MONOCHROME1 it undoes step 4 first, so the file's windows,
which are defined on the un-inverted values, still apply.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder
from pydicom.pixels import pixel_array as _pydicom_pixel_array
from pydicom.pixels.utils import get_nr_frames
from pydicom.uid import UID

from shared.errors import DataError

__all__ = [
    "GREYSCALE",
    "PIXEL_CODES",
    "Window",
    "apply_window",
    "decode_frames",
    "number_of_frames",
]

GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
PIXEL_CODES = (
    "data.no_pixels",
    "data.transfer_syntax",
    "data.corrupt_pixels",
    "data.unsupported_photometric",
)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

#: ``None`` or ``"file"``: the file's first VOI LUT or window; ``(center, width)``: explicit.
Window = tuple[float, float] | Literal["file"] | None


# --- step 1: what the file says about its pixels ---------------------------------------


def _photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation", "") or "").strip().upper()


def _check_description(ds: Dataset) -> None:
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        kind = str(ds.get("Modality", "") or "").strip()
        raise DataError(
            "This file holds no image (no Pixel Data)"
            + (f" (modality {kind})" if kind else "")
            + ". Structured reports, key object selections, presentation states and "
            "RT plans cannot be used for training; leave them out of the image folder.",
            code="data.no_pixels",
        )
    photometric = _photometric(ds)
    try:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        samples = 0
    if photometric and (photometric not in GREYSCALE or samples != 1):
        raise DataError(
            f"Only greyscale images can be used; this one is {photometric} "
            f"({samples} sample(s) per pixel). Colour images are usually screenshots or "
            "annotated copies; export the original greyscale series instead.",
            code="data.unsupported_photometric",
            photometric=photometric,
        )
    missing = [
        k
        for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")
        if ds.get(k) in (None, "")
    ]
    if missing:
        raise DataError(
            "The image description is incomplete (missing "
            f"{', '.join(missing)}), so its pixels cannot be read; re-export the image "
            "from the scanner or PACS.",
            code="data.corrupt_pixels",
        )


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if not uid:
        raise DataError(
            "The file does not say how its pixels are encoded (no Transfer Syntax UID in "
            "its file meta information); re-export it as a standard DICOM file (Part 10).",
            code="data.transfer_syntax",
        )
    return UID(str(uid))


def number_of_frames(ds: Dataset) -> int:
    """Number of frames (1 when Number of Frames is absent); ``data.corrupt_pixels`` if bad."""
    try:
        n = int(get_nr_frames(ds, warn=False))
    except Exception as exc:  # a malformed IS value: a data problem, not a bug
        raise DataError(
            "The Number of Frames in this file is not a valid number; re-export the image.",
            code="data.corrupt_pixels",
        ) from exc
    if n < 1:
        raise DataError("This file says it holds no frames.", code="data.corrupt_pixels")
    return n


# --- step 2: decode ---------------------------------------------------------------------


def _decode_stored(ds: Dataset, index: int | None) -> np.ndarray:
    """Stored pixel values as pydicom decodes them, without any of our checks on colour.

    Raises only ``DataError`` (``data.transfer_syntax`` or ``data.corrupt_pixels``).
    """
    uid = _transfer_syntax(ds)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        name = uid.name if uid.is_transfer_syntax else "unknown"
        raise DataError(
            f"Images encoded as {name} ({uid}) cannot be decoded; ask for the images to be "
            "exported uncompressed or with JPEG, JPEG-LS, JPEG 2000 or RLE compression.",
            code="data.transfer_syntax",
            transfer_syntax=str(uid),
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)  # e.g. "gdcm - requires gdcm"
        raise DataError(
            f"Images encoded as {uid.name} ({uid}) need a decoder plugin that is not "
            f"installed ({missing or 'no plugin'}); install pylibjpeg and its plugins.",
            code="data.transfer_syntax",
            transfer_syntax=str(uid),
        )
    if uid.is_compressed:
        _check_codestream_sizes(ds, uid)
    try:
        return np.asarray(_pydicom_pixel_array(ds, index=index))
    except MemoryError:
        raise
    except BaseException as exc:  # pydicom and the plugins raise many types on bad bytes
        # pylibjpeg-rle is Rust: on some damaged streams it panics, and pyo3 raises its
        # PanicException, a BaseException (not an Exception). Anything else that is not
        # an Exception (KeyboardInterrupt, SystemExit) is not about the file: let it go.
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        raise DataError(
            f"The pixel data ({uid.name}) cannot be decoded: it is truncated, corrupt, or "
            f"inconsistent with the image description ({type(exc).__name__}). Re-export "
            "the image.",
            code="data.corrupt_pixels",
            transfer_syntax=str(uid),
        ) from exc


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def _codestream_size(fragment: bytes) -> tuple[int, int] | None:
    """(rows, columns) a JPEG, JPEG-LS or JPEG 2000 codestream header claims, if readable.

    JPEG family (ITU T.81 B.2.2; JPEG-LS SOF55, T.87): the SOFn segment holds height and
    width; JPEG 2000 (T.800 A.5.1): the SIZ segment holds Xsiz/Ysiz and their offsets.
    """
    if fragment[:4] == b"\xff\x4f\xff\x51" and len(fragment) >= 24:
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", fragment[8:24])
        return ysiz - yo, xsiz - xo
    if fragment[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(fragment):
        if fragment[pos] != 0xFF:
            return None
        marker = fragment[pos + 1]
        (length,) = struct.unpack(">H", fragment[pos + 2 : pos + 4])
        if marker in _SOF:
            if pos + 9 > len(fragment):
                return None
            rows, cols = struct.unpack(">HH", fragment[pos + 5 : pos + 9])
            return rows, cols
        pos += 2 + length
    return None


def _check_codestream_sizes(ds: Dataset, uid: UID) -> None:
    """Refuse a codestream that claims a larger image than the header describes.

    A damaged header can claim gigapixels and make a decoder allocate until the process is
    killed: checked here, before any decoder runs.
    """
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    try:
        fragments = list(generate_fragments(ds.PixelData))
    except Exception:  # malformed encapsulation: the decoder reports it as corrupt
        return
    for fragment in fragments:
        size = _codestream_size(fragment)
        if size is not None and (size[0] > rows or size[1] > cols):
            raise DataError(
                f"The pixel data ({uid.name}) claims a {size[0]} x {size[1]} image but the "
                f"header says {rows} x {cols}: the file is corrupt. Re-export the image.",
                code="data.corrupt_pixels",
                transfer_syntax=str(uid),
            )


# --- step 3 and 4: modality LUT, MONOCHROME1 ---------------------------------------------


def _frame_item(ds: Dataset, frame: int, sequence: str, attr: str) -> Dataset | None:
    """The item that holds ``attr`` for ``frame``: top level, per-frame, or shared groups.

    Enhanced multi-frame objects (PS3.3 C.7.6.16) keep rescale and window in functional
    groups; per-frame values win over shared ones.
    """
    if attr in ds:
        return ds
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(groups)
        if not seq:
            continue
        group = seq[frame] if groups.startswith("PerFrame") and frame < len(seq) else seq[0]
        inner = group.get(sequence)
        if inner and attr in inner[0]:
            return inner[0]
    return None


def _float(value: object) -> float:
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _rescale(ds: Dataset, frame: int) -> tuple[float, float] | None:
    item = _frame_item(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    if item is None or "RescaleIntercept" not in item:
        return None
    slope, intercept = _float(item.RescaleSlope), _float(item.RescaleIntercept)
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        raise ValueError("Rescale Slope must be finite and non-zero")
    return slope, intercept


def _modality_range(ds: Dataset, frame: int, modality: np.ndarray) -> tuple[float, float]:
    """The range of modality values the file can hold (PS3.3 C.11.1.1.1).

    For float pixel data, or without Bits Stored, the frame's own min..max of ``modality``;
    ``lo + hi`` is the same whether ``modality`` was already inverted or not.
    """
    if ds.get("ModalityLUTSequence"):
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**depth - 1)
    if "PixelData" not in ds or ds.get("BitsStored") in (None, ""):
        return float(np.min(modality)), float(np.max(modality))
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    else:
        lo, hi = 0.0, float(2**bits - 1)
    rescale = _rescale(ds, frame)
    if rescale is not None:
        slope, intercept = rescale
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return lo, hi


def _to_modality(ds: Dataset, stored: np.ndarray, frame: int) -> np.ndarray:
    if ds.get("ModalityLUTSequence") and np.issubdtype(stored.dtype, np.integer):
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    out = stored.astype(np.float64)
    rescale = _rescale(ds, frame)
    if rescale is not None:
        out = out * rescale[0] + rescale[1]
    return out


def decode_frames(ds: Dataset, *, index: int | None = None) -> np.ndarray:
    """Frames ``(frames, rows, cols)`` float32 in modality units, bright = dense.

    ``index`` decodes only that frame (0-based), giving ``(1, rows, cols)``: cheaper for a
    large multi-frame object. Raises only :class:`DataError`, with ``code`` one of
    :data:`PIXEL_CODES`, or ``data.frame`` for an ``index`` out of range.
    """
    try:
        return _decode_frames(ds, index)
    except (DataError, MemoryError):
        raise
    except Exception as exc:  # a malformed element in the image description itself
        raise DataError(
            "The image description in this file is malformed "
            f"({type(exc).__name__}), so its pixels cannot be read; re-export the image.",
            code="data.corrupt_pixels",
        ) from exc


def _decode_frames(ds: Dataset, index: int | None) -> np.ndarray:
    _check_description(ds)
    n = number_of_frames(ds)
    if index is not None and not 0 <= index < n:
        raise DataError(
            f"Frame {index} was asked for, but this image has {n} frame(s).",
            code="data.frame",
        )
    stored = _decode_stored(ds, index)
    rows, cols = int(ds.Rows), int(ds.Columns)
    count = 1 if index is not None else n
    try:
        stored = stored.reshape(count, rows, cols)
        frames = np.empty((count, rows, cols), dtype=np.float32)
        monochrome1 = _photometric(ds) == "MONOCHROME1"
        for i in range(count):
            frame = index if index is not None else i
            values = _to_modality(ds, stored[i], frame)
            if monochrome1:
                lo, hi = _modality_range(ds, frame, values)
                values = (lo + hi) - values
            frames[i] = values
    except DataError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # bad LUT descriptor, slope, shape: the file is inconsistent
        raise DataError(
            "The pixel values cannot be converted to modality units: the Modality LUT or "
            f"Rescale Slope/Intercept is invalid ({type(exc).__name__}). Re-export the image.",
            code="data.corrupt_pixels",
        ) from exc
    if not np.isfinite(frames).all():
        raise DataError(
            "The image holds values that are not finite numbers (NaN or infinity) or "
            "too large for 32-bit floats; it cannot be used for training.",
            code="data.corrupt_pixels",
        )
    return frames


# --- windowing --------------------------------------------------------------------------


def _window_values(ds: Dataset, frame: int) -> tuple[float, float, str] | None:
    item = _frame_item(ds, frame, "FrameVOILUTSequence", "WindowCenter")
    if item is None or "WindowWidth" not in item:
        return None
    function = str(item.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    return _float(item.WindowCenter), _float(item.WindowWidth), function


def _linear(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 (LINEAR), C.11.2.1.3 (LINEAR_EXACT, SIGMOID), output in [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise ValueError("a LINEAR window needs a width of at least 1")
    if width == 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def apply_window(
    frames: np.ndarray, ds: Dataset, *, window: Window = None, index: int | None = None
) -> np.ndarray:
    """``frames`` from :func:`decode_frames` through a window, as float32 in [0, 1].

    ``window`` ``None`` or ``"file"`` uses the file's first VOI LUT (VOI LUT Sequence), else
    its first Window Center/Width (per frame for enhanced multi-frame objects), else the
    frame's own min..max; ``(center, width)`` is an explicit LINEAR window in modality units
    (for CT, Hounsfield units). ``index`` says which frame ``frames`` holds when it came from
    ``decode_frames(ds, index=...)``. Raises only :class:`DataError` (``data.window``).
    """
    frames = np.asarray(frames, dtype=np.float64)
    if frames.ndim != 3:
        raise DataError("Pass frames shaped (frames, rows, cols).", code="data.window")
    out = np.empty(frames.shape, dtype=np.float32)
    try:
        monochrome1 = _photometric(ds) == "MONOCHROME1"
        for i, values in enumerate(frames):
            frame = index if index is not None else i
            if monochrome1:  # the file's windows apply to the values before inversion
                lo, hi = _modality_range(ds, frame, values)
                values = (lo + hi) - values
            result = _window_one(values, ds, frame, window)
            out[i] = 1.0 - result if monochrome1 else result
    except DataError:
        raise
    except Exception as exc:  # a malformed VOI LUT or window in the file
        raise DataError(
            f"The window cannot be applied ({type(exc).__name__}: {exc}); pass an explicit "
            "(center, width) or train without windowing.",
            code="data.window",
        ) from exc
    return out


def _window_one(values: np.ndarray, ds: Dataset, frame: int, window: Window) -> np.ndarray:
    if window is not None and window != "file":
        center, width = (float(v) for v in window)
        if not (math.isfinite(center) and math.isfinite(width)) or width < 1:
            raise DataError(
                f"The window ({center}, {width}) is invalid; the width must be at least 1.",
                code="data.window",
            )
        return _linear(values, center, width, "LINEAR")
    voi = ds.get("VOILUTSequence")
    if voi and "LUTDescriptor" in voi[0] and "LUTData" in voi[0]:
        depth = int(voi[0].LUTDescriptor[2])
        mapped = apply_voi(np.rint(values).astype(np.int64), ds, 0)
        return np.asarray(mapped, dtype=np.float64) / float(2**depth - 1)
    found = _window_values(ds, frame)
    if found is not None:
        return _linear(values, *found)
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
