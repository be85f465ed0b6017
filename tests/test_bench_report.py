"""``make bench`` turns RESULT lines into docs/performance.md."""

from __future__ import annotations

from benchmarks.report import parse, render

LOG = """== benchmarks.aggregation
model: 52 tensors
RESULT gbs=4.3 memcpy_gbs=7.4 ratio=0.58 peak_mem_ratio=2.0
== benchmarks.dicom_import
RESULT files=5000 overhead_ratio=0.81 reimport_ratio=0.04 files_per_s=5800
"""


def test_result_lines_are_collected_per_benchmark() -> None:
    rows = parse(LOG)
    assert rows == [
        ("aggregation", "gbs=4.3 memcpy_gbs=7.4 ratio=0.58 peak_mem_ratio=2.0"),
        ("dicom_import", "files=5000 overhead_ratio=0.81 reimport_ratio=0.04 files_per_s=5800"),
    ]
    page = render(rows, "Test CPU, 2 cores", "2026-01-01 00:00 UTC")
    assert "Machine: Test CPU, 2 cores" in page
    assert "| `dicom_import` | `files=5000 overhead_ratio=0.81" in page
