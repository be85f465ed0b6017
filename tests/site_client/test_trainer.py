"""The site's trainer: a real child process that trains on real DICOM files, or is killed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from shared.errors import TrainingCancelled, TrainingError
from shared.models.registry import build_model
from shared.models.state import model_arrays
from shared.plan import demo_plan
from shared.synthetic import generate_federation
from shared.tensors import decode_tensors, encode_tensors
from site_client.core.trainer import Trainer


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fed")
    return generate_federation(
        root, sites=1, seed=5, images_per_site=16, test_images=4, image_size=64
    )


def _job(tmp_path: Path, federation, **plan_overrides) -> dict:
    plan = demo_plan(rounds=1, input_size=32, batch_size=8, **plan_overrides)
    model = build_model(plan.architecture, plan.architecture_version, input_size=32, seed=plan.seed)
    model_path = tmp_path / "global.safetensors"
    model_path.write_bytes(encode_tensors(model_arrays(model)))
    site = federation.sites[0]
    return {
        "plan": plan.to_dict(),
        "model_path": str(model_path),
        "dicom_dir": str(site.dicom_dir),
        "labels_csv": str(site.labels_csv),
        "cache_dir": str(tmp_path / "cache"),
        "data_seed": 0,
        "seed": 11,
    }


def test_training_produces_a_deterministic_update_of_the_model_layout(
    tmp_path: Path, federation
) -> None:
    job = _job(tmp_path, federation)
    trainer = Trainer(tmp_path / "jobs")
    first = asyncio.run(trainer.train("a", job))
    second = asyncio.run(trainer.train("b", job))  # second run hits the tensor cache
    base = decode_tensors(Path(job["model_path"]).read_bytes())
    update = decode_tensors(first.update_path.read_bytes())
    assert set(update) == set(base)
    assert all(update[k].shape == base[k].shape for k in base)
    assert any(np.abs(update[k]).max() > 0 for k in base)  # it trained
    assert first.num_samples == second.num_samples > 0
    assert first.update_path.read_bytes() == second.update_path.read_bytes()
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_cancel_kills_the_training_process(tmp_path: Path, federation) -> None:
    job = _job(tmp_path, federation, local_epochs=500)
    trainer = Trainer(tmp_path / "jobs")

    async def scenario() -> float:
        task = asyncio.ensure_future(trainer.train("long", job))
        progress = tmp_path / "jobs" / "long.progress"
        deadline = time.monotonic() + 60
        while not progress.exists():  # wait until it is really training
            assert time.monotonic() < deadline, "training never started"
            await asyncio.sleep(0.05)
        started = time.monotonic()
        trainer.cancel()
        with pytest.raises(TrainingCancelled, match="cancelled"):
            await task
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 5.0
    assert not trainer.busy


def test_a_failing_job_reports_a_clear_error(tmp_path: Path, federation) -> None:
    job = _job(tmp_path, federation)
    job["labels_csv"] = str(tmp_path / "missing.csv")
    with pytest.raises(TrainingError, match=r"missing\.csv") as info:
        asyncio.run(Trainer(tmp_path / "jobs").train("bad", job))
    assert info.value.code.startswith("data.")
