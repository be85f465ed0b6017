"""A run paused because the coordinator could not write to its disk, and how the operator
learns of it.

Theory of operation: when a durable write fails (disk full, a file size limit, a failing or
read-only device), the server stops the run where it is instead of going on with state it
could not save: it acts on no more round decisions, so nothing more is aggregated, committed
or acknowledged, while the sites stay connected and keep their work. Everything acknowledged
before is on disk already (blobs and rows are written before their acknowledgement), so
nothing is lost or half-written. The server logs the failure at ERROR and writes
``paused.json`` beside the database, a few hundred bytes, which ``tessera-coordinator status``
shows. If even that file cannot be written, the log is the record.

Restarting the coordinator once the disk is fixed clears the marker and resumes the run from
what is on disk (the restart path every crash takes). The marker is an operational flag, like
``serve.port``, not federation state: the database may be the very thing that cannot be
written.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.files import write_durably

PAUSE_FILE = "paused.json"


@dataclass(frozen=True, slots=True)
class Pause:
    """Run ``run_id`` stopped at ``round`` at time ``at`` because of ``code``: ``reason``."""

    run_id: str
    round: int
    code: str
    reason: str
    at: float

    @property
    def advice(self) -> str:
        return (
            "Free disk space or fix the data directory (permissions, device), then restart "
            "the coordinator (tessera-coordinator serve): the run resumes where it stopped."
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "advice": self.advice}


def write_pause(root: Path, pause: Pause) -> None:
    """Record ``pause`` in data directory ``root``. Raises ``OSError``: the disk may be what
    failed, and the caller then logs that the marker could not be written."""
    data = json.dumps(pause.to_dict(), indent=2).encode("utf-8")
    write_durably(root / PAUSE_FILE, [data])


def read_pause(root: Path) -> Pause | None:
    """The pause recorded in ``root``, if any (an unreadable marker reads as one, with the
    reason that it could not be read: a pause is never hidden)."""
    path = root / PAUSE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Pause(
            run_id=str(raw["run_id"]),
            round=int(raw["round"]),
            code=str(raw["code"]),
            reason=str(raw["reason"]),
            at=float(raw["at"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Pause("?", 0, "storage.pause_marker", f"{path} cannot be read: {exc}", 0.0)


def clear_pause(root: Path) -> Pause | None:
    """Remove the marker at a start, returning the pause it recorded."""
    pause = read_pause(root)
    (root / PAUSE_FILE).unlink(missing_ok=True)
    return pause
