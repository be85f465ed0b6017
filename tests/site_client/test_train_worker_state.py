"""What the training worker keeps at the site between rounds (issue 6): FedBN's normalisation
layers and top-k's error-feedback residual, in the job's ``state_dir``.

``run_job`` / ``validate_job`` are called in this process on real DICOM files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.aggregation import local_keys
from shared.compression import get_codec
from shared.models.registry import build_model
from shared.models.state import model_arrays
from shared.plan import demo_plan
from shared.synthetic import generate_federation
from shared.tensors import decode_tensors, encode_tensors, tensor_digest
from site_client.core import local_state
from site_client.core.train_worker import run_job, validate_job


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fed")
    return generate_federation(
        root, sites=1, seed=5, images_per_site=16, test_images=4, image_size=64
    )


def _job(tmp_path: Path, federation, rnd: int, **plan_overrides) -> dict:
    plan = demo_plan(rounds=3, input_size=32, batch_size=8, local_epochs=1, **plan_overrides)
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
        "update_path": str(tmp_path / f"update-r{rnd}.bin"),
        "data_seed": 0,
        "seed": 11,
        "threads": 1,
        "state_dir": str(tmp_path / "state"),
        "round": rnd,
    }


def test_fedbn_sends_shared_entries_and_keeps_its_layers_per_round(tmp_path: Path, federation):
    job = _job(tmp_path, federation, 1, aggregation="fedbn")
    run_job(job)
    initial = decode_tensors(Path(job["model_path"]).read_bytes())
    local = local_keys(initial)
    update = decode_tensors(Path(job["update_path"]).read_bytes())
    assert set(update) == set(initial) - local  # nothing of the normalisation layers leaves
    folder = Path(job["state_dir"])
    own1 = local_state.load(folder, local_state.NORM_LAYERS, up_to=1)
    assert own1 is not None and set(own1) == local
    assert any(not np.array_equal(own1[n], initial[n]) for n in local)
    # Round 2 starts from round 1's layers: training it twice gives the same update and
    # layers (a retried round), and its layers move on from round 1's.
    job2 = _job(tmp_path, federation, 2, aggregation="fedbn")
    run_job(job2)
    first = Path(job2["update_path"]).read_bytes()
    own2 = local_state.load(folder, local_state.NORM_LAYERS, up_to=2)
    run_job(job2)
    assert Path(job2["update_path"]).read_bytes() == first
    again = local_state.load(folder, local_state.NORM_LAYERS, up_to=2)
    assert own2 is not None and again is not None
    assert all(np.array_equal(own2[n], again[n]) for n in local)
    # The model is validated with the site's own layers: other layers, other metrics.
    valid = {**job2, "kind": "validate"}
    with_own = validate_job(valid)["metrics"]
    without = validate_job({**valid, "state_dir": str(tmp_path / "none")})["metrics"]
    assert with_own["loss"] != without["loss"]


def test_topk_keeps_what_it_did_not_send_for_the_next_round(tmp_path: Path, federation):
    job = _job(tmp_path, federation, 1, compression="topk:0.1+zstd")
    run_job(job)
    codec = get_codec("topk:0.1+zstd")
    initial = decode_tensors(Path(job["model_path"]).read_bytes())
    layout = {n: (a.shape, str(a.dtype)) for n, a in initial.items()}
    sent = codec.decode(Path(job["update_path"]).read_bytes(), layout)
    residual = local_state.load(Path(job["state_dir"]), local_state.FEEDBACK, up_to=1)
    assert residual is not None and set(residual) == set(initial)
    # sent + kept is the whole update: train the same round without compression to compare
    (tmp_path / "plain").mkdir()
    plain = _job(tmp_path / "plain", federation, 1)
    run_job(plain)
    whole = decode_tensors(Path(plain["update_path"]).read_bytes())
    for name in initial:
        np.testing.assert_allclose(sent[name] + residual[name], whole[name], atol=1e-6)
        assert np.count_nonzero(sent[name]) <= max(1, int(np.ceil(0.1 * whole[name].size)))
