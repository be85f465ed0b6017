"""Where a round's seconds go: per-phase durations recorded by each side, per round.

A site records, for every round it trains in, how long it spent in each of ``SITE_PHASES``;
the coordinator records its own ``COORDINATOR_PHASES``. Phases in order along a round:

    coordinator  model_encode   the global model's offer (digest) and signature, once per round
    site         download       invitation checked -> the whole model is on disk, hash checked
                 verify         plan and model signatures, the stored model's SHA-256
                 train          the job in the warm worker: data from the tensor cache, the model
                                loaded, local steps (the worker's verify and encode excluded),
                                after any wait for the worker to finish validating the last
                                round's model (and, in an encrypted run, for the run's key)
                 encode_update  the update's safetensors bytes, its digest, signature, outbox
                 upload         update offered -> the coordinator says it is on disk
    coordinator  aggregate      the round's updates folded into the new global model
                 persist        the new model (and server optimiser state) written durably
                 commit         the round's rows in SQLite: its opening, and its commit

Durations come from a monotonic clock. ``started`` and ``ended`` are instants of that clock
too: comparable between processes of one machine (Linux's CLOCK_MONOTONIC counts from boot),
which is how ``benchmarks/round_overhead.py`` lines the two sides up; across machines only the
durations mean anything. ``cpu`` is the processor time the side's processes used in the
round (``time.process_time``: every thread; a site adds its training worker's), so that a
busy, shared machine can still tell how much work a round is. Each side appends one JSON line
per round to ``TIMINGS_FILE`` in its
own data directory, written when the round ends for it (a site: its update was accepted; the
coordinator: the round is committed), and keeps the records in memory. Nothing of it is sent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

TIMINGS_FILE = "timings.jsonl"
SITE_PHASES = ("download", "verify", "train", "encode_update", "upload")
COORDINATOR_PHASES = ("model_encode", "aggregate", "persist", "commit")
_PHASES = {"site": SITE_PHASES, "coordinator": COORDINATOR_PHASES}

Side = Literal["site", "coordinator"]


def _seconds(name: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, not {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundTimings:
    """One side's phases of one round, in seconds. ``site_id`` is empty for the coordinator."""

    side: Side
    run_id: str
    round: int
    started: float
    ended: float
    phases: Mapping[str, float] = field(default_factory=dict)
    site_id: str = ""
    cpu: float = 0.0

    def __post_init__(self) -> None:
        if self.side not in _PHASES:
            raise ValueError(f"side must be 'site' or 'coordinator', not {self.side!r}")
        if not isinstance(self.round, int) or isinstance(self.round, bool) or self.round < 1:
            raise ValueError(f"round must be an integer >= 1, not {self.round!r}")
        _seconds("started", self.started)
        _seconds("ended", self.ended)
        if _seconds("cpu", self.cpu) < 0:
            raise ValueError(f"cpu must not be negative, not {self.cpu}")
        unknown = set(self.phases) - set(_PHASES[self.side])
        if unknown:
            raise ValueError(f"unknown {self.side} phases {sorted(unknown)}")
        for name, value in self.phases.items():
            if _seconds(name, value) < 0:
                raise ValueError(f"phase {name} has a negative duration {value}")
        ordered = {p: float(self.phases[p]) for p in _PHASES[self.side] if p in self.phases}
        object.__setattr__(self, "phases", ordered)

    @property
    def seconds(self) -> float:
        """Wall time from ``started`` to ``ended``."""
        return self.ended - self.started

    def to_json(self) -> str:
        return json.dumps(
            {
                "side": self.side,
                "run_id": self.run_id,
                "round": self.round,
                "site_id": self.site_id,
                "started": self.started,
                "ended": self.ended,
                "phases": dict(self.phases),
                "cpu": self.cpu,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, line: str) -> RoundTimings:
        """Raises ``ValueError`` for anything that is not a record written by ``to_json``."""
        data = json.loads(line)
        if not isinstance(data, dict) or not isinstance(data.get("phases"), dict):
            raise ValueError("not a round timings record")
        return cls(**data)


class PhaseClock:
    """Collects one round's phases as they happen (the adapters hold one per open round;
    they read their own clock and pass instants in, so this stays pure)."""

    def __init__(self, side: Side, run_id: str, rnd: int, started: float, site_id: str = ""):
        self.side, self.run_id, self.round, self.site_id = side, run_id, rnd, site_id
        self.started = started
        self.phases: dict[str, float] = {}
        self.marks: dict[str, float] = {}
        self.cpu = 0.0

    def add(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to ``phase`` (a phase may happen in several pieces)."""
        self.phases[phase] = self.phases.get(phase, 0.0) + max(0.0, seconds)

    def mark(self, phase: str, now: float) -> None:
        """``phase`` starts at ``now``; ``stop`` adds the time since."""
        self.marks[phase] = now

    def stop(self, phase: str, now: float) -> None:
        start = self.marks.pop(phase, None)
        if start is not None:
            self.add(phase, now - start)

    def record(self, ended: float) -> RoundTimings:
        return RoundTimings(
            side=self.side,
            run_id=self.run_id,
            round=self.round,
            site_id=self.site_id,
            started=self.started,
            ended=ended,
            phases=dict(self.phases),
            cpu=max(0.0, self.cpu),
        )


def append_timings(path: Path, record: RoundTimings) -> None:
    """Append one record as a JSON line (a measurement, not state: no fsync)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(record.to_json() + "\n")


def read_timings(path: Path) -> list[RoundTimings]:
    """Every record in ``path`` (none if it does not exist); a torn last line is skipped."""
    try:
        lines = path.read_text("utf-8").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(RoundTimings.from_json(line))
        except (ValueError, TypeError):
            continue
    return records
