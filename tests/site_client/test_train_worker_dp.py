"""Client-level DP in the training worker: the update that is written is clipped and noised.

``run_job`` is called in this process on real DICOM files (the warm process around it is
tested in ``test_trainer``); the noise is fixed by the job's ``dp_seed``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from shared.models.registry import build_model
from shared.models.state import model_arrays
from shared.plan import demo_plan
from shared.synthetic import generate_federation
from shared.tensors import decode_tensors, encode_tensors, tensor_digest
from site_client.core.train_worker import run_job


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fed")
    return generate_federation(
        root, sites=1, seed=5, images_per_site=16, test_images=4, image_size=64
    )


def _job(tmp_path: Path, federation, name: str, **plan_overrides) -> dict:
    plan = demo_plan(
        rounds=3,
        input_size=32,
        batch_size=8,
        local_epochs=1,
        weighting="uniform",
        **plan_overrides,
    )
    model = build_model(plan.architecture, plan.architecture_version, input_size=32, seed=0)
    data = encode_tensors(model_arrays(model))
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
        "update_path": str(tmp_path / f"{name}.safetensors"),
        "data_seed": 0,
        "seed": 11,
        "threads": 1,
    }


def _vector(path: str) -> np.ndarray:
    arrays = decode_tensors(Path(path).read_bytes())
    return np.concatenate([arrays[k].reshape(-1).astype(np.float64) for k in sorted(arrays)])


def test_the_written_update_is_clipped_and_carries_the_full_noise(tmp_path: Path, federation):
    clean_job = _job(tmp_path, federation, "clean")
    clean = run_job(clean_job)
    assert "dp" not in clean
    raw = _vector(clean_job["update_path"])
    raw_norm = float(np.linalg.norm(raw))
    clip = raw_norm / 4  # the bound bites: the update is scaled to a quarter
    dp = {"clip_norm": clip, "noise_multiplier": 0.002, "delta": 1e-5}
    job = {**_job(tmp_path, federation, "noisy", dp=dp), "dp_seed": 7}
    record = run_job(job)
    assert record["dp"]["norm"] == pytest.approx(raw_norm, rel=1e-4)
    assert record["dp"]["clipped_norm"] == pytest.approx(clip, rel=1e-6)
    assert record["dp"]["noise_std"] == pytest.approx(0.002 * clip)
    noisy = _vector(job["update_path"])
    noise = noisy - raw * (clip / raw_norm)
    assert noise.std() == pytest.approx(0.002 * clip, rel=0.03)
    assert abs(noise.mean()) < 5 * 0.002 * clip / math.sqrt(noise.size)
    # The written file is what was hashed and will be signed.
    assert record["sha256"] == tensor_digest(Path(job["update_path"]).read_bytes())
    # The same seed gives the same bytes; without one, the noise is fresh (os.urandom).
    again = run_job({**job, "update_path": str(tmp_path / "again.safetensors")})
    assert again["sha256"] == record["sha256"]
    fresh = {k: v for k, v in job.items() if k != "dp_seed"}
    fresh["update_path"] = str(tmp_path / "fresh.safetensors")
    assert run_job(fresh)["sha256"] != record["sha256"]
