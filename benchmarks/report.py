"""Collect the RESULT lines of a ``make bench`` run into ``docs/performance.md``.

Run as ``python -m benchmarks.report LOG`` with the benchmarks' combined output; the table
names the machine the figures come from, so that numbers from different machines are never
compared by accident.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def parse(log: str) -> list[tuple[str, str]]:
    """(benchmark, RESULT figures) in the order they ran; ``== benchmarks.NAME`` headers."""
    rows, current = [], "?"
    for line in log.splitlines():
        if line.startswith("== benchmarks."):
            current = line.removeprefix("== benchmarks.").strip()
        elif line.startswith("RESULT "):
            rows.append((current, line.removeprefix("RESULT ").strip()))
    return rows


def render(rows: list[tuple[str, str]], machine: str, when: str) -> str:
    lines = [
        "# Performance",
        "",
        "Written by `make bench` from the benchmarks' `RESULT` lines (each benchmark's module",
        "docstring says what it measures and which bar applies).",
        "",
        f"Machine: {machine}. Run: {when}.",
        "",
        "| benchmark | RESULT |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | `{result}` |" for name, result in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    log = Path(argv[0]).read_text("utf-8") if argv else sys.stdin.read()
    rows = parse(log)
    if not rows:
        print("no RESULT lines found", file=sys.stderr)
        return 1
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    OUT.write_text(render(rows, _machine(), when), "utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
