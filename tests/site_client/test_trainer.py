"""The site's trainer: a real, warm child process that trains on real DICOM files, or is killed.

Nothing is mocked: each test starts the real worker (``train_worker --serve``) through the
``Trainer`` and sends it real jobs over its pipe.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.errors import TrainingCancelled, TrainingError
from shared.models.registry import build_model
from shared.models.state import model_arrays
from shared.plan import TrainingPlan, demo_plan
from shared.synthetic import generate_federation
from shared.tensors import decode_tensors, encode_tensors, tensor_digest
from site_client.core.trainer import SILENCE_S, Trainer


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fed")
    return generate_federation(
        root, sites=1, seed=5, images_per_site=16, test_images=4, image_size=64
    )


def _model(job: dict):
    plan = TrainingPlan.from_dict(job["plan"])
    return build_model(plan.architecture, plan.architecture_version, input_size=32, seed=plan.seed)


def _job(tmp_path: Path, federation, **plan_overrides) -> dict:
    plan = demo_plan(rounds=1, input_size=32, batch_size=8, **plan_overrides)
    data = encode_tensors(model_arrays(_model({"plan": plan.to_dict()})))
    model_path = tmp_path / "global.safetensors"
    model_path.write_bytes(data)
    site = federation.sites[0]
    return {
        "plan": plan.to_dict(),
        "model_path": str(model_path),
        "model_sha256": tensor_digest(data),
        "dicom_dir": str(site.dicom_dir),
        "labels_csv": str(site.labels_csv),
        "cache_dir": str(tmp_path / "cache"),
        "data_seed": 0,
        "seed": 11,
    }


async def _started_training(trainer: Trainer, name: str, job: dict) -> asyncio.Task:
    """Start a job and return once the worker reports its first training step."""
    stepped = asyncio.Event()
    trainer.on_progress = lambda step, total: stepped.set()
    task = asyncio.ensure_future(trainer.train(name, job))
    await asyncio.wait_for(stepped.wait(), timeout=60)
    return task


async def test_jobs_reuse_one_warm_process_which_survives_failed_jobs(
    tmp_path: Path, federation
) -> None:
    job = _job(tmp_path, federation)
    trainer = Trainer(tmp_path / "jobs")
    try:
        first = await trainer.train("a", job)
        pid = trainer.pid
        second = await trainer.train("b", job)  # the second one also hits the tensor cache
        assert pid is not None and trainer.pid == pid

        bad = {**job, "labels_csv": str(tmp_path / "missing.csv")}
        with pytest.raises(TrainingError, match=r"missing\.csv") as info:
            await trainer.train("bad", bad)
        assert info.value.code.startswith("data.")
        corrupt = {**job, "model_sha256": "0" * 64}  # the cached model no longer matches
        with pytest.raises(TrainingError, match="damaged") as info:
            await trainer.train("corrupt", corrupt)
        assert info.value.code == "training.model_corrupt"
        assert trainer.pid == pid  # failed jobs are results: the warm worker stays
    finally:
        await trainer.close()
    assert trainer.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # close() ended the worker
    assert not Path(job["model_path"]).exists()  # deleted, so it is downloaded again
    base = decode_tensors(encode_tensors(model_arrays(_model(job))))
    data = first.update_path.read_bytes()
    update = decode_tensors(data)
    assert set(update) == set(base)
    assert all(update[k].shape == base[k].shape for k in base)
    assert any(np.abs(update[k]).max() > 0 for k in base)  # it trained
    assert first.sha256 == tensor_digest(data) and first.size == len(data)
    assert encode_tensors(update) == data  # written straight from the arrays, same bytes
    assert first.num_samples == second.num_samples > 0
    # a reused model trains exactly like a freshly built one
    assert second.update_path.read_bytes() == data
    assert set(first.timings) == {"verify", "train", "encode", "cpu"}
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


async def test_the_next_update_is_written_over_the_file_of_the_last_accepted_one(
    tmp_path: Path, federation
) -> None:
    """An accepted update's file is kept as the spare, and the next job writes its update in
    it (the same file, its pages already cached): the bytes are exactly the update's, whether
    the spare was longer or there was none."""
    job = _job(tmp_path, federation)
    trainer = Trainer(tmp_path / "jobs")
    try:
        first = await trainer.train("a", job)  # no spare yet
        data = first.update_path.read_bytes()
        kept = tmp_path / "outbox.safetensors"
        first.update_path.replace(kept)  # as the site moves it to its outbox
        trainer.recycle_update(kept)
        assert not kept.exists() and trainer.spare_path.is_file()
        inode = trainer.spare_path.stat().st_ino

        second = await trainer.train("b", job)
        assert not trainer.spare_path.exists()
        assert second.update_path.stat().st_ino == inode  # written in the spare's file
        assert second.update_path.read_bytes() == data
        assert second.sha256 == tensor_digest(data) and second.size == len(data)

        # A spare longer than the update (an earlier, bigger model): nothing of it is left.
        second.update_path.replace(kept)
        with kept.open("ab") as fh:
            fh.write(b"left over" * 100_000)
        trainer.recycle_update(kept)
        third = await trainer.train("c", job)
        assert third.update_path.read_bytes() == data
        assert third.sha256 == tensor_digest(data)
    finally:
        await trainer.close()


async def test_cancel_kills_the_worker_and_the_next_job_starts_a_fresh_one(
    tmp_path: Path, federation
) -> None:
    job = _job(tmp_path, federation, local_epochs=500)
    trainer = Trainer(tmp_path / "jobs")
    try:
        task = await _started_training(trainer, "long", job)
        victim = trainer.pid
        assert trainer.busy and trainer.progress is not None
        trainer.cancel()
        with pytest.raises(TrainingCancelled, match="cancelled"):
            await asyncio.wait_for(task, timeout=10)
        assert not trainer.busy
        with pytest.raises(ProcessLookupError):
            os.kill(victim, 0)  # killed and reaped, not left training
        outcome = await trainer.train("short", _job(tmp_path, federation))
        assert outcome.num_samples > 0
        assert trainer.pid not in (None, victim)
    finally:
        await trainer.close()


async def test_a_killed_worker_gives_a_clear_error_then_the_trainer_recovers(
    tmp_path: Path, federation
) -> None:
    trainer = Trainer(tmp_path / "jobs")
    try:
        task = await _started_training(
            trainer, "doomed", _job(tmp_path, federation, local_epochs=500)
        )
        victim = trainer.pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)  # as the kernel's OOM killer would
        with pytest.raises(TrainingError, match="stopped unexpectedly") as info:
            await asyncio.wait_for(task, timeout=10)
        assert info.value.code == "training.crashed"
        outcome = await trainer.train("after", _job(tmp_path, federation))
        assert outcome.num_samples > 0 and trainer.pid != victim
    finally:
        await trainer.close()


def test_the_one_job_command_line_still_works(tmp_path: Path, federation) -> None:
    job = _job(tmp_path, federation)
    job.update(
        update_path=str(tmp_path / "u.safetensors"),
        result_path=str(tmp_path / "result.json"),
        progress_path=str(tmp_path / "progress"),
    )
    (tmp_path / "job.json").write_text(json.dumps(job), "utf-8")
    subprocess.run(
        [sys.executable, "-m", "site_client.core.train_worker", str(tmp_path / "job.json")],
        check=True,
        timeout=120,
    )
    record = json.loads((tmp_path / "result.json").read_text("utf-8"))
    assert record["ok"] and record["num_samples"] > 0
    assert record["sha256"] == tensor_digest((tmp_path / "u.safetensors").read_bytes())


async def test_a_worker_that_falls_silent_is_stopped_and_the_next_job_runs(
    tmp_path: Path, federation
) -> None:
    """A worker frozen mid-job (SIGSTOP: as if hung on a dead network share) says nothing;
    after ``silence_s`` it is killed with a clear error, never waited on for ever."""
    trainer = Trainer(tmp_path / "jobs")
    try:
        task = await _started_training(
            trainer, "frozen", _job(tmp_path, federation, local_epochs=500)
        )
        trainer.silence_s = 3.0  # from the next line read on (start-up takes longer here)
        stepped = asyncio.Event()
        trainer.on_progress = lambda step, total: stepped.set()
        await asyncio.wait_for(stepped.wait(), timeout=60)
        victim = trainer.pid
        assert victim is not None
        os.kill(victim, signal.SIGSTOP)
        with pytest.raises(TrainingError, match="said nothing for 3 s") as info:
            await asyncio.wait_for(task, timeout=60)
        assert info.value.code == "training.silent" and not trainer.busy
        with pytest.raises(ProcessLookupError):
            os.kill(victim, 0)  # killed and reaped
        trainer.silence_s = SILENCE_S  # a fresh worker on a busy machine may be slow to start
        outcome = await trainer.train("after", _job(tmp_path, federation))
        assert outcome.num_samples > 0 and trainer.pid not in (None, victim)
    finally:
        await trainer.close()
