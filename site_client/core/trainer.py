"""Runs local training in a child process that can be cancelled at any moment."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import TrainingCancelled, TrainingError


@dataclass(frozen=True, slots=True)
class TrainingOutcome:
    update_path: Path
    num_samples: int
    train_loss: float


class Trainer:
    """One training job at a time; ``cancel()`` terminates the child process."""

    def __init__(self, jobs_dir: Path, *, threads: int = 1) -> None:
        self.jobs_dir = jobs_dir
        self.threads = threads
        self._proc: asyncio.subprocess.Process | None = None
        self._cancelled = False

    @property
    def busy(self) -> bool:
        return self._proc is not None

    async def train(self, name: str, job: dict[str, Any]) -> TrainingOutcome:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        job = {
            **job,
            "threads": self.threads,
            "update_path": str(self.jobs_dir / f"{name}.update.safetensors"),
            "result_path": str(self.jobs_dir / f"{name}.result.json"),
            "progress_path": str(self.jobs_dir / f"{name}.progress"),
        }
        job_path = self.jobs_dir / f"{name}.job.json"
        job_path.write_text(json.dumps(job), "utf-8")
        Path(job["result_path"]).unlink(missing_ok=True)
        self._cancelled = False
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "site_client.core.train_worker",
            str(job_path),
            stdout=asyncio.subprocess.DEVNULL,
        )
        try:
            await self._proc.wait()
        except asyncio.CancelledError:
            self.cancel()
            raise
        finally:
            self._proc = None
        if self._cancelled:
            raise TrainingCancelled("training was cancelled")
        try:
            record = json.loads(Path(job["result_path"]).read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise TrainingError("the training process ended without a result") from exc
        if not record.get("ok"):
            raise TrainingError(
                record.get("message", "training failed"), code=record.get("code", "training.failed")
            )
        return TrainingOutcome(
            Path(job["update_path"]), int(record["num_samples"]), float(record["train_loss"])
        )

    def cancel(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._cancelled = True
            self._proc.kill()
