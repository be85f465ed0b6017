"""Runs local training in a warm child process that can be cancelled at any moment.

Theory of operation: a ``Trainer`` owns at most one child process,
``python -m site_client.core.train_worker --serve``, started on first use (or by
``warm_up()``, so the torch import overlaps the model download) and kept across rounds: a
round then costs its training, not a new interpreter and a torch import. Jobs go down the
child's stdin and results come back on its stdout, one JSON object per line (never pickle);
progress lines arrive while it trains. The guarantees of a process per job are kept:

- ``cancel()`` kills the child at once; the job raises ``TrainingCancelled`` and the next job
  starts a fresh child.
- A child that dies during a job (killed, out of memory, a crash in native code) makes the
  job raise ``TrainingError`` (``training.crashed``); the next job starts a fresh child. One
  that died while idle, between rounds, is replaced and the job sent again, once.
- A failed job (bad data, diverged loss) is a result like any other: the child lives on.
- A child that says nothing for ``silence_s`` (no progress line, no result: hung on a dead
  network share, stopped, deadlocked) is killed and the job raises ``TrainingError``
  (``training.silent``): no wait is without a deadline. Progress lines come with every few
  training steps, so the bound is about silence, not about how long training takes.

The child belongs to the event loop that started it (asyncio subprocesses do); call
``close()`` before that loop ends. ``Participant.run`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import TrainingCancelled, TrainingError
from shared.files import recycle

log = logging.getLogger("tessera.site")

LINE_LIMIT = 1 << 20  # a result line is a few hundred bytes; anything near this is garbage
SILENCE_S = 1800.0  # the longest a worker may say nothing during a job (preparing images)


@dataclass(frozen=True, slots=True)
class TrainingOutcome:
    """What a job produced. ``sha256`` and ``size`` describe the update file, computed by the
    worker as it wrote it; ``timings`` are the worker's phases in seconds (``verify``,
    ``train``, ``encode``) and its processor time for the job (``cpu``)."""

    update_path: Path
    num_samples: int
    train_loss: float
    sha256: str = ""
    size: int = 0
    timings: Mapping[str, float] = field(default_factory=dict)
    steps: int = 0  # optimiser steps taken: what a round of DP-SGD is charged


class Trainer:
    """One training job at a time, in a warm child process; ``cancel()`` kills it."""

    def __init__(
        self,
        jobs_dir: Path,
        *,
        threads: int = 1,
        on_progress: Callable[[int, int], None] | None = None,
        silence_s: float = SILENCE_S,
    ) -> None:
        self.jobs_dir = jobs_dir
        self.threads = threads
        self.silence_s = silence_s
        self.on_progress = on_progress
        self.progress: tuple[int, int] | None = None  # (step, total) of the running job
        self._proc: asyncio.subprocess.Process | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Task[asyncio.subprocess.Process] | None = None
        self._busy = False
        self._cancelled = False

    @property
    def spare_path(self) -> Path:
        """Where the site leaves an update file it no longer needs (``recycle_update``): the
        worker writes the next update over it (``shared.files.open_recycled``)."""
        return self.jobs_dir / "spare.update"

    def recycle_update(self, path: Path) -> None:
        """Keep the file of an update the coordinator accepted as the next one's spare."""
        recycle(path, self.spare_path)

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def pid(self) -> int | None:
        """The warm worker's process id, if one is running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def warm_up(self) -> None:
        """Start the worker now if there is none, so that the next job finds it ready."""
        try:
            await self._worker()
        except TrainingError as exc:
            log.warning("%s", exc)  # the job itself will report it

    async def train(self, name: str, job: dict[str, Any]) -> TrainingOutcome:
        if self._busy:
            raise TrainingError("A training job is already running.", code="training.busy")
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        update_path = self.jobs_dir / f"{name}.update.safetensors"
        request = {
            "type": "job",
            "name": name,
            "job": {
                **job,
                "threads": self.threads,
                "update_path": str(update_path),
                "spare_path": str(self.spare_path),
            },
        }
        line = (json.dumps(request) + "\n").encode("utf-8")
        self._busy, self._cancelled, self.progress = True, False, None
        try:
            record = await self._run(line)
        except asyncio.CancelledError:
            self.cancel()
            raise
        finally:
            self._busy = False
        if not record.get("ok"):
            raise TrainingError(
                str(record.get("message", "training failed")),
                code=str(record.get("code", "training.failed")),
            )
        return TrainingOutcome(
            update_path,
            int(record["num_samples"]),
            float(record["train_loss"]),
            str(record.get("sha256", "")),
            int(record.get("size", 0)),
            {k: float(v) for k, v in dict(record.get("timings") or {}).items()},
            int(record.get("steps", 0)),
        )

    async def validate(self, name: str, job: dict[str, Any]) -> dict[str, Any]:
        """The metrics of a ``kind: validate`` job (the model on the held-out split)."""
        if self._busy:
            raise TrainingError("A training job is already running.", code="training.busy")
        request = {
            "type": "job",
            "name": name,
            "job": {**job, "kind": "validate", "threads": self.threads},
        }
        line = (json.dumps(request) + "\n").encode("utf-8")
        self._busy, self._cancelled = True, False
        try:
            record = await self._run(line)
        except asyncio.CancelledError:
            self.cancel()
            raise
        finally:
            self._busy = False
        if not record.get("ok"):
            raise TrainingError(
                str(record.get("message", "validation failed")),
                code=str(record.get("code", "training.failed")),
            )
        return dict(record["metrics"])

    def cancel(self) -> None:
        """Stop the running job at once (kill the worker); nothing happens when idle."""
        if not self._busy:
            return
        self._cancelled = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def close(self) -> None:
        """End the worker (nothing it holds needs tidying: a job's files are replaced
        atomically)."""
        starting, self._starting = self._starting, None
        if starting is not None and not starting.done():
            with contextlib.suppress(TrainingError):
                await starting  # a worker being started now would outlive us otherwise
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if self._loop is not asyncio.get_running_loop():
            _kill_pid(proc.pid)
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()

    # -- internals -----------------------------------------------------------------------

    async def _run(self, line: bytes) -> dict[str, Any]:
        for attempt in (1, 2):
            reused = self._alive()
            proc = await self._worker()
            if self._cancelled:  # cancelled while the worker was starting
                raise TrainingCancelled("Training was cancelled.")
            assert proc.stdin is not None
            record, heard = None, False
            try:
                proc.stdin.write(line)
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass
            else:
                record, heard = await self._read_result(proc)
            if record is not None:
                return record
            code = await self._reap(proc)
            if self._cancelled:
                raise TrainingCancelled("Training was cancelled.")
            if attempt == 1 and reused and not heard:
                log.warning("the idle training process had ended (exit code %s); restarted", code)
                continue
            raise TrainingError(
                f"The training process stopped unexpectedly (exit code {code}) before it "
                "finished; nothing was sent. It starts again for the next round; if this "
                "repeats, check the site's memory and its log.",
                code="training.crashed",
            )
        raise AssertionError("unreachable")

    async def _read_result(
        self, proc: asyncio.subprocess.Process
    ) -> tuple[dict[str, Any] | None, bool]:
        """The job's result record, or ``None`` if the worker's output ended first; and
        whether anything at all was heard from the worker for this job."""
        assert proc.stdout is not None
        heard = False
        while True:
            try:
                raw = await asyncio.wait_for(proc.stdout.readline(), self.silence_s)
            except ValueError:  # a line beyond LINE_LIMIT: the channel is corrupt
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return None, heard
            except TimeoutError:
                await self._reap(proc)
                raise TrainingError(
                    f"The training process said nothing for {self.silence_s:.0f} s (no "
                    "progress, no result), so it was stopped; nothing was sent. It starts "
                    "again for the next round; if this repeats, check that the site's image "
                    "folders and disks answer, and the site's log.",
                    code="training.silent",
                ) from None
            if not raw:
                return None, heard
            try:
                message = json.loads(raw)
            except ValueError:
                log.warning("the training process wrote something unexpected; ignored")
                continue
            if not isinstance(message, dict):
                continue
            heard = True
            if message.get("type") == "progress":
                self.progress = (int(message["step"]), int(message["total"]))
                if self.on_progress is not None:
                    self.on_progress(*self.progress)
            elif message.get("type") == "result":
                return message, heard

    def _alive(self) -> bool:
        proc = self._proc
        return (
            proc is not None
            and proc.returncode is None
            and self._loop is asyncio.get_running_loop()
        )

    async def _worker(self) -> asyncio.subprocess.Process:
        loop = asyncio.get_running_loop()
        if self._alive():
            assert self._proc is not None
            return self._proc
        if self._proc is not None and self._loop is not loop:
            _kill_pid(self._proc.pid)  # left behind by another event loop
        self._proc = None
        starting = self._starting
        if starting is None or starting.done() or starting.get_loop() is not loop:
            starting = self._starting = loop.create_task(self._spawn())
        return await asyncio.shield(starting)

    async def _spawn(self) -> asyncio.subprocess.Process:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "site_client.core.train_worker",
                "--serve",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=LINE_LIMIT,
            )
        except OSError as exc:
            raise TrainingError(
                f"The training process cannot be started ({exc}).", code="training.start"
            ) from exc
        self._proc, self._loop = proc, asyncio.get_running_loop()
        return proc

    async def _reap(self, proc: asyncio.subprocess.Process) -> int:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        code = await proc.wait()
        if self._proc is proc:
            self._proc = None
        return code


def _kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
