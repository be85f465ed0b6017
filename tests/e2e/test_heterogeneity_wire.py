"""End to end, issue 6: FedBN and update compression in real runs.

A real coordinator and two real site processes over TLS websockets on loopback, started through
their command lines, training on real DICOM files (as ``test_federation.py``). What is checked
is what crossed the wire (the coordinator's stored update blobs) and what each site kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.export import export_run
from coordinator.federation import Federation
from coordinator.localrun import LocalFederation
from shared.aggregation import local_keys
from shared.compression import get_codec
from shared.plan import demo_plan
from shared.synthetic import generate_federation
from shared.tensors import decode_tensors, encode_tensors
from site_client.core import local_state

pytestmark = pytest.mark.e2e

TINY = {"input_size": 32, "batch_size": 16, "local_epochs": 1}


@pytest.fixture
def launcher(tmp_path: Path):
    lf = LocalFederation(tmp_path)
    yield lf
    lf.stop()


def _run(launcher: LocalFederation, **plan_fields) -> tuple[Federation, str]:
    """A finished 2-site, 2-round run of the demo plan with ``plan_fields``."""
    manifest = generate_federation(
        launcher.root / "data", sites=2, seed=3, images_per_site=24, test_images=8, image_size=64
    )
    fed = launcher.init()
    launcher.start_coordinator()
    for s in manifest.sites:
        launcher.enrol_site(fed, s.name, s.dicom_dir, s.labels_csv)
    plan = demo_plan(rounds=2, quorum=2, min_sites=2, round_deadline_s=90, **TINY, **plan_fields)
    run_id = launcher.start_run(fed, plan)
    for site in launcher.sites:
        launcher.start_site(site)
    launcher.wait_sites(timeout=180)
    assert fed.store.run(run_id).status == "finished"
    rounds = [r for r in fed.store.rounds(run_id) if r["status"] == "closed"]
    assert [(r["round"], r["n_updates"]) for r in rounds] == [(1, 2), (2, 2)]
    return fed, run_id


def test_fedbn_keeps_normalisation_layers_at_each_site(launcher: LocalFederation) -> None:
    # With server momentum: its velocity is server state, kept between rounds like FedAdam's.
    fed, run_id = _run(launcher, aggregation="fedbn", aggregation_params={"server_momentum": 0.5})
    rounds = [r for r in fed.store.rounds(run_id) if r["status"] == "closed"]
    states = [r["opt_state"] for r in rounds]
    assert all(states) and states[0] != states[1] and all(fed.blobs.has(d) for d in states)
    initial = decode_tensors(fed.blobs.get(rounds[0]["model_in"]))
    local = local_keys(initial)
    assert local and any(name.endswith("running_mean") for name in local)
    # The coordinator never received a normalisation tensor: every stored update holds exactly
    # the shared entries.
    for rnd in (1, 2):
        for update in fed.store.updates(run_id, rnd):
            assert set(decode_tensors(fed.blobs.get(update.digest))) == set(initial) - local
    # The global models carry the initial normalisation values; the shared entries trained.
    for r in rounds:
        model = decode_tensors(fed.blobs.get(r["model_out"]))
        for name in local:
            np.testing.assert_array_equal(model[name], initial[name])
        assert any(not np.array_equal(model[n], initial[n]) for n in set(initial) - local)
    # Each site kept its own layers, on its disk, after the last round; they moved away from
    # the initial values and differ between the sites (their scanners differ).
    kept = []
    for site in launcher.sites:
        folder = local_state.run_folder(site.data_dir, run_id)
        own = local_state.load(folder, local_state.NORM_LAYERS, up_to=2)
        assert own is not None and set(own) == local
        kept.append(own)
    means = sorted(n for n in local if n.endswith("running_mean"))
    assert all(not np.allclose(kept[0][n], initial[n]) for n in means)
    assert all(not np.allclose(kept[0][n], kept[1][n]) for n in means)
    # Both sites validated each round's model (with their own layers) and reported it.
    validations = fed.store.validations(run_id)
    assert sorted(v["round"] for v in validations) == [1, 1, 2, 2]
    # The sites' scanners differ; the plan already is FedBN, so the report compares them
    # without a warning.
    page = (export_run(fed, run_id, launcher.root / "bundle").out / "report.html").read_text()
    assert "Scanner differences between sites" in page and "strong (" in page
    assert "<p class='warn'>The sites" not in page


def test_int8_on_the_wire_sends_under_a_third_of_fp32(launcher: LocalFederation) -> None:
    fed, run_id = _run(launcher, compression="int8")
    rounds = [r for r in fed.store.rounds(run_id) if r["status"] == "closed"]
    initial = decode_tensors(fed.blobs.get(rounds[0]["model_in"]))
    # A float32 update of this model is exactly these bytes (the site's uncompressed
    # encoding, shared.tensors): what the same run without a codec stores per update.
    fp32_bytes = len(encode_tensors({n: np.zeros_like(a) for n, a in initial.items()}))
    codec = get_codec("int8")
    layout = {n: (a.shape, str(a.dtype)) for n, a in initial.items()}
    for rnd in (1, 2):
        updates = fed.store.updates(run_id, rnd)
        for update in updates:
            stored = fed.blobs.path(update.digest).stat().st_size
            assert stored <= 0.3 * fp32_bytes, (stored, fp32_bytes)
            decoded = codec.decode(fed.blobs.get(update.digest), layout)
            assert any(np.any(a != 0) for a in decoded.values())  # a real update, not zeros
    # The int8 updates trained the model and the sites validated it.
    assert rounds[1]["model_out"] != rounds[1]["model_in"] != rounds[0]["model_in"]
    assert sorted(v["round"] for v in fed.store.validations(run_id)) == [1, 1, 2, 2]
    # The coordinator compared the two scanners, warned the operator, and the report says so.
    page = (export_run(fed, run_id, launcher.root / "bundle").out / "report.html").read_text()
    assert "<p class='warn'>The sites&#x27; scanners differ strongly" in page
    assert "consider FedBN" in page and "Update compression</td><td>int8" in page
    assert (
        "scanner shift: The sites' scanners differ strongly"
        in (launcher.root / "coordinator.log").read_text()
    )
