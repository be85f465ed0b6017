"""The shape of a site's data summary as it may leave the site: counts only.

A site that allows it sends the coordinator its "scanner fingerprint" (counts by modality,
scanner, label, image size, spacing, bits, photometric). This module is the gate: a summary
is accepted only if it is exactly that shape, with short category names and non-negative
integer counts, so no identifier or free text can ride along.
"""

from __future__ import annotations

from typing import Any

from shared.errors import RemoteProtocolError

TOTALS = ("images", "patients", "studies", "series", "rejected_files")
COUNTS = (
    "by_modality",
    "by_scanner",
    "by_image_size",
    "by_pixel_spacing",
    "by_bits_stored",
    "by_photometric",
)
MAX_CATEGORIES = 200  # per table
MAX_NAME = 64


def _bad(why: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"data summary: {why}", code="protocol.schema")


def _count(value: Any, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(f"{where} must be a non-negative integer count")


def _table(value: Any, where: str) -> None:
    if not isinstance(value, dict) or len(value) > MAX_CATEGORIES:
        raise _bad(f"{where} must be a table of at most {MAX_CATEGORIES} counts")
    for name, count in value.items():
        if not isinstance(name, str) or len(name) > MAX_NAME:
            raise _bad(f"{where} has a category name longer than {MAX_NAME} characters")
        _count(count, f"{where}[{name[:20]!r}]")


def check_summary(summary: Any) -> None:
    """Raise ``RemoteProtocolError`` unless ``summary`` is counts only, in the known shape."""
    if not isinstance(summary, dict):
        raise _bad("must be an object")
    expected = {*TOTALS, *COUNTS, "by_label"}
    if set(summary) != expected:
        raise _bad(f"fields {sorted(set(summary) ^ expected)[:5]} are missing or not allowed")
    for key in TOTALS:
        _count(summary[key], key)
    for key in COUNTS:
        _table(summary[key], key)
    labels = summary["by_label"]
    if not isinstance(labels, dict) or len(labels) > 20:
        raise _bad("by_label must be a table of at most 20 label columns")
    for name, table in labels.items():
        if not isinstance(name, str) or len(name) > MAX_NAME:
            raise _bad("by_label has a label name that is too long")
        _table(table, f"by_label[{name[:20]!r}]")
