"""The benchmarks' in-process federation: FedBN keeps each site's normalisation layers at the
site while the rest is shared, and codecs shrink what is counted as sent."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks._federation_sim import Simulation, load_federation, logits_of, site_seed
from shared.aggregation import make_strategy, norm_layer_keys
from shared.models.registry import build_model
from shared.models.state import load_model_arrays, model_arrays
from shared.plan import demo_plan
from shared.synthetic import generate_federation
from shared.training import train_local

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    manifest = generate_federation(
        tmp_path_factory.mktemp("fed"),
        sites=2,
        seed=0,
        images_per_site=[16, 12],
        test_images=10,
        image_size=SIZE,
    )
    return load_federation(manifest, SIZE)


@pytest.fixture(scope="module")
def plan():
    return demo_plan(rounds=1, input_size=SIZE, local_epochs=1, batch_size=6, quorum=2, min_sites=2)


def _alone(plan, data, k):
    """Site ``k``'s round-1 training from the initial model, outside the simulation."""
    model = build_model("small_cnn", "1", input_size=SIZE, seed=plan.seed)
    site = data.sites[k]
    train_local(model, site.images, site.labels, plan, seed=site_seed(plan, 0, k))
    return model_arrays(model)


def test_fedbn_round_keeps_batchnorm_at_each_site_and_shares_conv_weights(data, plan):
    assert [len(s.labels) for s in data.sites] == [12, 10]  # about 80 %, whole patients
    assert set(data.test_site.tolist()) == {0, 1}
    sim = Simulation(data, plan, make_strategy("fedbn"))
    initial = {n: a.copy() for n, a in sim.global_weights.items()}
    bn = norm_layer_keys(build_model("small_cnn", "1", input_size=SIZE, seed=0))
    assert sim.local_names == bn & set(initial)
    assert "features.0.1.running_mean" in sim.local_names
    assert set(sim.shared_layout).isdisjoint(bn)  # no BN entry is ever sent

    sim.run_round()

    alone = [_alone(plan, data, k) for k in range(2)]
    counts = np.array([len(s.labels) for s in data.sites], dtype=np.float64)
    site0, site1 = sim.site_weights(0), sim.site_weights(1)
    for name in initial:
        if name in sim.local_names:
            # Each site keeps exactly what its own training made; the global copy is untouched.
            np.testing.assert_array_equal(site0[name], alone[0][name])
            np.testing.assert_array_equal(site1[name], alone[1][name])
            np.testing.assert_array_equal(sim.global_weights[name], initial[name])
        else:
            # Shared: one value for both sites, the sample-weighted mean of their training.
            np.testing.assert_array_equal(site0[name], site1[name])
            mean = (counts[0] * alone[0][name] + counts[1] * alone[1][name]) / counts.sum()
            np.testing.assert_allclose(site0[name], mean, atol=1e-6)
    for name in ("features.0.1.running_mean", "features.3.1.running_var", "features.2.1.bias"):
        assert not np.allclose(site0[name], site1[name])
    conv = "features.0.0.weight"
    assert not np.array_equal(sim.global_weights[conv], initial[conv])

    # Evaluation scores each site's test images with that site's own BatchNorm layers.
    scores = sim.scores()
    model = build_model("small_cnn", "1", input_size=SIZE, seed=0)
    for k, weights in enumerate((site0, site1)):
        load_model_arrays(model, weights)
        mask = data.test_site == k
        np.testing.assert_array_equal(scores[mask], logits_of(model, data.test_images[mask]))


def test_codecs_shrink_the_counted_bytes_and_topk_keeps_its_residual(data, plan):
    runs = {}
    for codec in ("none", "int8+zstd", "topk:0.1+zstd"):
        sim = Simulation(data, plan, make_strategy("fedavg"), codec=codec)
        sim.run_round()
        runs[codec] = sim
    raw = runs["none"].raw_bytes
    assert raw == 2 * 4 * sum(int(np.prod(s)) for s, _ in runs["none"].shared_layout.values())
    assert runs["none"].upload_bytes > raw  # the container's header on top of the values
    assert runs["int8+zstd"].raw_bytes == raw
    assert runs["int8+zstd"].upload_bytes <= 0.3 * raw
    assert runs["topk:0.1+zstd"].upload_bytes <= 0.25 * raw
    ref = runs["none"].global_weights
    for name, value in runs["int8+zstd"].global_weights.items():
        np.testing.assert_allclose(value, ref[name], atol=0.01 * max(1e-3, np.abs(ref[name]).max()))
    residual = runs["topk:0.1+zstd"].feedback[0].residual
    assert any(np.abs(r).max() > 0 for r in residual.values())
    with pytest.raises(ValueError, match="FedBN needs every test image's site"):
        bad = Simulation(
            data.__class__(
                sites=data.sites,
                test_images=data.test_images,
                test_labels=data.test_labels,
                test_site=np.full_like(data.test_site, -1),
            ),
            plan,
            make_strategy("fedbn"),
        )
        bad.scores()
