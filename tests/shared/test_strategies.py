"""Aggregation strategies: hand-computed results, properties, refused configurations.

Expected numbers are worked out by hand in the comments beside them, never by calling the
function under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import safetensors.numpy as stn
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from shared.aggregation import (
    FedAvgAccumulator,
    FedAvgConfig,
    FedBNConfig,
    FedProxConfig,
    MedianConfig,
    ServerOptConfig,
    ServerOptState,
    TrimmedMeanConfig,
    aggregate_deltas,
    apply_aggregate,
    coordinate_median,
    fedavg,
    fedavg_weights,
    initial_state,
    keeps_norm_layers_local,
    local_entries,
    local_keys,
    local_training_options,
    make_strategy,
    merge_local,
    norm_layer_keys,
    server_optimiser,
    server_step,
    split_update,
    trimmed_mean,
    upload_layout,
    validate_strategy,
)
from shared.errors import PlanError, UpdateError
from shared.models.registry import build_model

F32 = np.float32
FEDAVG_ATOL = 1e-5  # accumulator error bound for max_abs 16: 2**-22 * 16 + n * 2**-26


def upd(**arrays: list[float] | list[list[float]]) -> dict[str, np.ndarray]:
    return {name: np.array(v, dtype=F32) for name, v in arrays.items()}


def assert_same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


# --- FedAvg and FedProx ------------------------------------------------------------------

TWO = [upd(w=[1, 2], b=[[0.5]]), upd(w=[3, -2], b=[[-0.5]])]


def test_fedavg_weighted_by_samples_hand_computed():
    got = fedavg(TWO, [1, 3], weighting="samples")
    # w: (1*1 + 3*3)/4 = 2.5, (1*2 + 3*-2)/4 = -1;  b: (1*0.5 + 3*-0.5)/4 = -0.25
    np.testing.assert_allclose(got["w"], [2.5, -1.0], atol=FEDAVG_ATOL)
    np.testing.assert_allclose(got["b"], [[-0.25]], atol=FEDAVG_ATOL)
    assert got["w"].dtype == F32 and got["b"].shape == (1, 1)


def test_fedavg_uniform_hand_computed_ignores_counts():
    got = fedavg(TWO, None, weighting="uniform")
    # w: (1 + 3)/2 = 2, (2 - 2)/2 = 0;  b: 0
    np.testing.assert_allclose(got["w"], [2.0, 0.0], atol=FEDAVG_ATOL)
    np.testing.assert_allclose(got["b"], [[0.0]], atol=FEDAVG_ATOL)
    assert fedavg_weights([1, 3], "uniform", 2) == [0.5, 0.5]
    assert fedavg_weights([1, 3], "samples", 2) == [0.25, 0.75]


def test_fedavg_equals_the_streaming_accumulator_bit_for_bit():
    rng = np.random.default_rng(0)
    updates = [{"a": rng.uniform(-1, 1, (7, 5)).astype(F32)} for _ in range(3)]
    counts = [10, 250, 3]
    acc = FedAvgAccumulator({"a": ((7, 5), "float32")}, max_abs=16.0, max_total_weight=1 + 1e-9)
    for u, c in zip(updates, counts, strict=True):
        acc.add(u, c / sum(counts))  # as coordinator/aggregation.py does
    assert_same_bits(fedavg(updates, counts), acc.result())


def test_fedprox_tells_the_site_mu_and_aggregates_as_fedavg():
    config = FedProxConfig(mu=0.01)
    assert local_training_options(config) == {"proximal": 0.01}
    assert local_training_options(FedAvgConfig()) == {}
    got = aggregate_deltas(config, TWO, [1, 3])
    np.testing.assert_allclose(got["w"], [2.5, -1.0], atol=FEDAVG_ATOL)
    assert make_strategy("fedprox", {"mu": 0.1}, weighting="uniform") == FedProxConfig(
        mu=0.1, weighting="uniform"
    )


def test_apply_aggregate_adds_delta_in_the_weights_dtype():
    new, state = apply_aggregate(FedAvgConfig(), upd(w=[1, 1]), upd(w=[0.5, -0.25]))
    assert state is None and new["w"].dtype == F32
    np.testing.assert_array_equal(new["w"], [1.5, 0.75])


# --- robust estimators -------------------------------------------------------------------

FIVE = [
    upd(w=[1, 5, -1]),
    upd(w=[2, -3, 0]),
    upd(w=[10, 0, -2]),
    upd(w=[4, 1, 7]),
    upd(w=[0, 2, 3]),
]


def test_median_odd_and_even_hand_computed():
    # first three, sorted per coordinate: [1,2,10] [-3,0,5] [-2,-1,0] -> middle: 2, 0, -1
    np.testing.assert_array_equal(coordinate_median(FIVE[:3])["w"], [2, 0, -1])
    # first four: [1,2,4,10] [-3,0,1,5] [-2,-1,0,7] -> mean of the middle two: 3, 0.5, -0.5
    np.testing.assert_array_equal(coordinate_median(FIVE[:4])["w"], [3, 0.5, -0.5])
    assert coordinate_median(FIVE[:4])["w"].dtype == F32


def test_trimmed_mean_hand_computed():
    # n = 5, beta 0.2 -> k = 1. Sorted: [0,1,2,4,10] [-3,0,1,2,5] [-2,-1,0,3,7]
    # keep the middle three: (1+2+4)/3 = 7/3, (0+1+2)/3 = 1, (-1+0+3)/3 = 2/3
    got = trimmed_mean(FIVE, 0.2)["w"]
    np.testing.assert_array_equal(got, np.array([7 / 3, 1, 2 / 3], dtype=F32))
    # beta 0.4 -> k = 2: only the middle value remains, the median: 2, 1, 0
    np.testing.assert_array_equal(trimmed_mean(FIVE, 0.4)["w"], [2, 1, 0])
    # n = 4, beta 0.2 -> k = floor(0.8) = 0: the plain mean (1+2+10+4)/4 = 4.25, ...
    np.testing.assert_array_equal(trimmed_mean(FIVE[:4], 0.2)["w"], [4.25, 0.75, 1.0])


def test_robust_estimators_ignore_sample_counts():
    a = aggregate_deltas(MedianConfig(), FIVE, [1, 1, 1, 1, 1])
    b = aggregate_deltas(MedianConfig(), FIVE, [1, 1, 1000, 1, 1])
    assert_same_bits(a, b)
    np.testing.assert_array_equal(a["w"], [2, 1, 0])
    t = aggregate_deltas(TrimmedMeanConfig(trim_fraction=0.2), FIVE, [9, 1, 1, 1, 1])
    np.testing.assert_array_equal(t["w"], np.array([7 / 3, 1, 2 / 3], dtype=F32))


def test_median_and_trimmed_mean_resist_one_huge_update_fedavg_does_not():
    rng = np.random.default_rng(1)
    honest = [{"a": rng.uniform(-1, 1, (4, 6)).astype(F32)} for _ in range(4)]
    attack = {"a": np.full((4, 6), 1e6, dtype=F32)}
    updates = [*honest[:2], attack, *honest[2:]]
    lo = np.min([u["a"] for u in honest], axis=0)
    hi = np.max([u["a"] for u in honest], axis=0)
    for got in (coordinate_median(updates), trimmed_mean(updates, 0.2)):
        assert np.all(got["a"] >= lo) and np.all(got["a"] <= hi)
    plain = fedavg(updates, None, weighting="uniform", max_abs=2e6)
    assert np.all(plain["a"] > 1e5)  # one site of five moves every parameter by ~2e5


def test_robust_input_errors():
    with pytest.raises(UpdateError, match="No update to aggregate") as e:
        coordinate_median([])
    assert e.value.code == "update.empty"
    with pytest.raises(UpdateError, match="unexpected tensor") as e:
        trimmed_mean([upd(w=[1]), upd(w=[1], x=[2]), upd(w=[3])], 0.2)
    assert e.value.code == "update.keys"
    with pytest.raises(UpdateError, match="has shape") as e:
        coordinate_median([upd(w=[1, 2]), upd(w=[1])])
    assert e.value.code == "update.shape"
    with pytest.raises(UpdateError, match="NaN or infinite") as e:
        coordinate_median([upd(w=[1, 2]), upd(w=[1, math.inf])])
    assert e.value.code == "update.nonfinite"
    with pytest.raises(UpdateError, match="floating point") as e:
        coordinate_median([{"n": np.array([1], dtype=np.int64)}])
    assert e.value.code == "update.dtype"
    with pytest.raises(PlanError, match=r"'trim_fraction' must be a number in \(0, 0.5\)") as e:
        trimmed_mean(FIVE, 0.5)
    assert e.value.code == "plan.invalid"


# --- server optimisers (Reddi et al. 2021, Algorithm 2) ------------------------------------

X0 = upd(x=[1, 2, 3])


def run_two_steps(config, d1, d2):
    state = initial_state(X0, config)
    x1, s1 = server_step(X0, upd(x=d1), state, config)
    x2, s2 = server_step(x1, upd(x=d2), s1, config)
    return x1, s1, x2, s2


def close(a, b):
    np.testing.assert_allclose(a, np.array(b, dtype=np.float64), rtol=1e-6, atol=1e-7)


def test_fedadam_two_steps_hand_computed():
    c = ServerOptConfig(optimiser="fedadam", eta=0.1, beta1=0.5, beta2=0.75, tau=0.5)
    x1, s1, x2, s2 = run_two_steps(c, [0.5, -0.5, 0], [0.5, 0.5, 0])
    # v0 = tau^2 = 0.25, m0 = 0
    # m1 = 0.5*0 + 0.5*d1 = [0.25, -0.25, 0]
    # v1 = 0.75*0.25 + 0.25*d1^2 = [0.25, 0.25, 0.1875]
    # x1 = x0 + 0.1*m1/(sqrt(v1) + 0.5) = [1 + 0.025/1, 2 - 0.025/1, 3]
    close(s1.m["x"], [0.25, -0.25, 0])
    close(s1.v["x"], [0.25, 0.25, 0.1875])
    close(x1["x"], [1.025, 1.975, 3])
    # m2 = 0.5*m1 + 0.5*d2 = [0.375, 0.125, 0];  v2 = 0.75*v1 + 0.25*d2^2 = [.25, .25, .140625]
    # x2 = x1 + 0.1*m2/(0.5 + 0.5) = [1.0625, 1.9875, 3]
    close(s2.m["x"], [0.375, 0.125, 0])
    close(s2.v["x"], [0.25, 0.25, 0.140625])
    close(x2["x"], [1.0625, 1.9875, 3])
    assert (s1.step, s2.step) == (1, 2) and x2["x"].dtype == F32


def test_fedyogi_two_steps_hand_computed():
    c = ServerOptConfig(optimiser="fedyogi", eta=0.1, beta1=0.5, beta2=0.5, tau=0.5)
    x1, s1, x2, s2 = run_two_steps(c, [2, -0.5, 0], [2, 0.5, 0.25])
    # v0 = 0.25; d1^2 = [4, 0.25, 0]; sign(v0 - d1^2) = [-1, 0, +1]
    # v1 = v0 - 0.5*d1^2*sign = [0.25 + 2, 0.25, 0.25] = [2.25, 0.25, 0.25]
    # m1 = 0.5*d1 = [1, -0.25, 0];  x1 = x0 + 0.1*m1/(sqrt(v1) + 0.5) = [1 + 0.1/2, 2 - 0.025, 3]
    close(s1.v["x"], [2.25, 0.25, 0.25])
    close(x1["x"], [1.05, 1.975, 3])
    # d2^2 = [4, 0.25, 0.0625]; sign(v1 - d2^2) = [-1, 0, +1]
    # v2 = [2.25 + 2, 0.25, 0.25 - 0.5*0.0625] = [4.25, 0.25, 0.21875]   (Yogi may shrink v)
    # m2 = 0.5*m1 + 0.5*d2 = [1.5, 0.125, 0.125]
    close(s2.v["x"], [4.25, 0.25, 0.21875])
    close(s2.m["x"], [1.5, 0.125, 0.125])
    close(
        x2["x"],
        [
            1.05 + 0.1 * 1.5 / (math.sqrt(4.25) + 0.5),
            1.975 + 0.1 * 0.125 / (0.5 + 0.5),  # = 1.9875
            3 + 0.1 * 0.125 / (math.sqrt(0.21875) + 0.5),
        ],
    )


def test_fedadagrad_two_steps_hand_computed_and_beta2_unused():
    for beta2 in (0.0, 0.99):
        c = ServerOptConfig(optimiser="fedadagrad", eta=0.1, beta1=0.5, beta2=beta2, tau=0.75)
        x1, s1, x2, s2 = run_two_steps(c, [1, -1, 0], [0, 0, 0])
        # v0 = 0.5625; v1 = v0 + d1^2 = [1.5625, 1.5625, 0.5625] (sqrt: 1.25, 1.25, 0.75)
        # m1 = [0.5, -0.5, 0]; x1 = x0 + 0.1*m1/(1.25 + 0.75) = [1.025, 1.975, 3]
        close(s1.v["x"], [1.5625, 1.5625, 0.5625])
        close(x1["x"], [1.025, 1.975, 3])
        # zero delta: v2 = v1, m2 = 0.5*m1 = [0.25, -0.25, 0]: momentum still moves the model
        # x2 = x1 + 0.1*m2/2 = [1.0375, 1.9625, 3]
        close(s2.v["x"], [1.5625, 1.5625, 0.5625])
        close(x2["x"], [1.0375, 1.9625, 3])


weights_st = hnp.arrays(F32, (2, 3), elements=st.floats(-100, 100, width=32))


@settings(max_examples=40, deadline=None)
@given(weights_st, st.sampled_from(["fedadam", "fedyogi", "fedadagrad"]))
def test_server_optimisers_keep_weights_for_zero_delta_from_initial_state(w, optimiser):
    config = ServerOptConfig(optimiser=optimiser)
    weights = {"w": w}
    new, state = server_step(
        weights, {"w": np.zeros_like(w)}, initial_state(weights, config), config
    )
    np.testing.assert_array_equal(new["w"], w)  # exact; -0.0 + 0 step may become +0.0
    assert state.step == 1 and not state.m["w"].any()


def test_server_state_round_trips_through_safetensors_and_step_is_pure():
    c = ServerOptConfig(optimiser="fedadam", eta=0.1)
    weights = {"a.weight": np.ones((2, 2), F32), "a.bias": np.zeros(2, F32)}
    delta = {"a.weight": np.full((2, 2), 0.1, F32), "a.bias": np.array([1, -1], F32)}
    _, state = server_step(weights, delta, initial_state(weights, c), c)
    loaded = ServerOptState.from_arrays(stn.load(stn.save(state.to_arrays())))
    assert loaded.step == 1
    assert_same_bits(dict(loaded.m), dict(state.m))
    assert_same_bits(dict(loaded.v), dict(state.v))
    again = server_step(weights, delta, loaded, c)
    assert_same_bits(again[0], server_step(weights, delta, state, c)[0])
    np.testing.assert_array_equal(weights["a.weight"], 1.0)  # inputs untouched


def test_server_step_errors():
    c = ServerOptConfig(optimiser="fedadam")
    state = initial_state({"w": ((2,), "float32")}, c)
    with pytest.raises(UpdateError, match="missing 1 tensor") as e:
        server_step({"w": np.zeros(2, F32)}, {}, state, c)
    assert e.value.code == "update.keys"
    with pytest.raises(UpdateError, match="has shape") as e:
        server_step({"w": np.zeros(2, F32)}, {"w": np.zeros(3, F32)}, state, c)
    assert e.value.code == "update.shape"
    with pytest.raises(UpdateError, match="NaN or infinite") as e:
        server_step({"w": np.zeros(2, F32)}, {"w": np.array([0, np.nan], F32)}, state, c)
    assert e.value.code == "update.nonfinite"
    with pytest.raises(UpdateError, match="second moment of 'w' is not positive") as e:
        ServerOptState(step=0, m={"w": np.zeros(2, F32)}, v={"w": np.zeros(2, F32)})
    assert e.value.code == "update.state"
    with pytest.raises(UpdateError, match="unexpected entry 'x'") as e:
        ServerOptState.from_arrays({"step": np.array([0]), "x": np.zeros(1, F32)})
    assert e.value.code == "update.state"
    with pytest.raises(ValueError, match="needs its state"):
        apply_aggregate(c, {"w": np.zeros(2, F32)}, {"w": np.zeros(2, F32)})


# --- FedBN ---------------------------------------------------------------------------------


def test_norm_layers_of_small_cnn_by_type_and_by_name():
    model = build_model("small_cnn", "1", seed=0)
    suffixes = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {f"features.{i}.1.{s}" for i in range(4) for s in suffixes}  # BN in each block
    assert norm_layer_keys(model) == expected
    assert local_keys(model.state_dict()) == expected


def test_norm_layers_of_densenet121_agree():
    pytest.importorskip("monai")
    model = build_model("densenet121", "1", seed=0)
    keys = norm_layer_keys(model)
    # BatchNorm layers: norm0, 2 per dense layer (6+12+24+16 = 58), 1 per transition (3),
    # norm5 -> 1 + 116 + 3 + 1 = 121 layers of 5 entries each
    assert len(keys) == 605
    assert local_keys(model.state_dict()) == keys


def test_norm_layer_keys_finds_groupnorm_that_names_cannot():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.Flatten(), nn.LayerNorm(4))
    assert norm_layer_keys(model) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert local_keys(model.state_dict()) == set()  # no running statistics to go by


def test_fedbn_aggregates_shared_entries_only_and_site_keeps_its_own():
    local = frozenset({"bn.weight", "bn.running_mean"})
    u1 = upd(conv=[1, 3], **{"bn.weight": [5], "bn.running_mean": [9]})
    u2 = upd(conv=[3, 1], **{"bn.weight": [7], "bn.running_mean": [-9]})
    shared, kept = split_update(u1, local)
    assert list(shared) == ["conv"] and set(kept) == local
    delta = aggregate_deltas(FedBNConfig(weighting="uniform"), [u1, shared], None, local=local)
    assert list(delta) == ["conv"]
    np.testing.assert_allclose(delta["conv"], [1, 3], atol=FEDAVG_ATOL)  # mean of equal
    delta = aggregate_deltas(FedBNConfig(), [u1, u2], [1, 1], local=local)
    np.testing.assert_allclose(delta["conv"], [2, 2], atol=FEDAVG_ATOL)  # (1+3)/2, (3+1)/2
    glob = upd(conv=[0, 0], **{"bn.weight": [1], "bn.running_mean": [0]})
    new, _ = apply_aggregate(FedBNConfig(), glob, delta)
    assert new["bn.weight"] is glob["bn.weight"]  # aggregation never touches local layers
    site = merge_local(new, kept)  # the site puts its own values back
    np.testing.assert_array_equal(site["bn.weight"], [5])
    np.testing.assert_allclose(site["conv"], [2, 2], atol=FEDAVG_ATOL)
    assert keeps_norm_layers_local(FedBNConfig()) and not keeps_norm_layers_local(FedAvgConfig())
    with pytest.raises(UpdateError, match="global model lacks") as e:
        merge_local(glob, {"other": np.zeros(1, F32)})
    assert e.value.code == "update.keys"


def test_upload_layout_drops_fedbns_local_entries_by_name_only():
    layout = {
        "conv.weight": ((2, 1, 3, 3), "float32"),
        "bn.weight": ((2,), "float32"),
        "bn.bias": ((2,), "float32"),
        "bn.running_mean": ((2,), "float32"),
        "bn.running_var": ((2,), "float32"),
        "head.weight": ((1, 2), "float32"),
    }
    bn = {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}
    assert local_entries(FedBNConfig(), layout) == bn
    assert upload_layout(FedBNConfig(), layout) == {
        "conv.weight": ((2, 1, 3, 3), "float32"),
        "head.weight": ((1, 2), "float32"),
    }
    for other in (FedAvgConfig(), make_strategy("fedprox", {"mu": 0.1}), MedianConfig()):
        assert local_entries(other, layout) == frozenset()
        assert upload_layout(other, layout) == layout


# --- properties ----------------------------------------------------------------------------

update_st = st.fixed_dictionaries(
    {
        "a": hnp.arrays(F32, (3,), elements=st.floats(-8, 8, width=32)),
        "b": hnp.arrays(F32, (2, 2), elements=st.floats(-8, 8, width=32)),
    }
)
updates_st = st.lists(update_st, min_size=1, max_size=6)
counts_st = st.lists(st.integers(1, 1000), min_size=6, max_size=6)

ROBUST = [
    ("median", coordinate_median),
    ("trimmed", lambda us: trimmed_mean(us, 0.2)),
]


@settings(max_examples=60, deadline=None)
@given(update_st, st.integers(1, 6), counts_st)
def test_identical_updates_give_the_identity(u, n, counts):
    same = [u] * n
    for _, fn in ROBUST:
        got = fn(same)
        for name in u:
            np.testing.assert_array_equal(got[name], u[name])  # exact (up to the sign of 0)
    got = fedavg(same, counts[:n])
    for name in u:
        np.testing.assert_allclose(got[name], u[name], rtol=0, atol=FEDAVG_ATOL)


@settings(max_examples=60, deadline=None)
@given(updates_st, counts_st, st.randoms(use_true_random=False))
def test_order_of_sites_does_not_matter_bit_for_bit(updates, counts, rnd):
    counts = counts[: len(updates)]
    order = list(range(len(updates)))
    rnd.shuffle(order)
    shuffled = [updates[i] for i in order]
    for _, fn in ROBUST:
        assert_same_bits(fn(updates), fn(shuffled))
    assert_same_bits(fedavg(updates, counts), fedavg(shuffled, [counts[i] for i in order]))


@settings(max_examples=60, deadline=None)
@given(updates_st, counts_st)
def test_results_stay_within_per_parameter_min_max(updates, counts):
    counts = counts[: len(updates)]
    for name in updates[0]:
        stack = np.stack([u[name] for u in updates])
        lo, hi = stack.min(axis=0), stack.max(axis=0)
        for _, fn in ROBUST:
            got = fn(updates)[name]
            assert np.all(got >= lo) and np.all(got <= hi)
        got = fedavg(updates, counts)[name]
        assert np.all(got >= lo - FEDAVG_ATOL) and np.all(got <= hi + FEDAVG_ATOL)


# --- configuration errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: FedAvgConfig(weighting="by_size"), r"'weighting' must be one of 'samples'"),
        (lambda: FedProxConfig(mu=0), r"'mu' must be a finite number > 0; got 0"),
        (lambda: FedProxConfig(mu=-1.0), r"'mu' must be a finite number > 0"),
        (lambda: FedProxConfig(mu=math.nan), r"'mu' must be a finite number > 0; got nan"),
        (lambda: FedProxConfig(mu=True), r"'mu' must be a finite number > 0; got True"),
        (lambda: FedBNConfig(weighting="x"), r"'weighting' must be one of"),
        (lambda: ServerOptConfig(optimiser="fedsgd"), r"'optimiser' must be one of 'fedadam'"),
        (lambda: ServerOptConfig(optimiser="fedadam", eta=0), r"'eta' must be a finite number > 0"),
        (lambda: ServerOptConfig(optimiser="fedadam", beta1=1.0), r"'beta1' must be .*\[0, 1\)"),
        (lambda: ServerOptConfig(optimiser="fedyogi", beta2=-0.1), r"'beta2' must be .*\[0, 1\)"),
        (lambda: ServerOptConfig(optimiser="fedadam", tau=0.0), r"'tau' must be a finite number"),
        (lambda: ServerOptConfig(optimiser="fedadam", tau=1e-30), r"'tau' must be at least"),
        (lambda: TrimmedMeanConfig(trim_fraction=0.5), r"'trim_fraction' must be .*\(0, 0.5\)"),
        (lambda: TrimmedMeanConfig(trim_fraction=0), r"'trim_fraction' must be"),
        (lambda: make_strategy("krum"), r"'aggregation' must be one of 'fedavg'"),
        (lambda: make_strategy("fedprox"), r"'mu' must be given for fedprox"),
        (lambda: make_strategy("median", {"beta": 1}), r"'median' has no setting\(s\) 'beta'"),
        (lambda: make_strategy("fedadam", {"lr": 1}), r"it takes 'eta', 'beta1', 'beta2', 'tau'"),
    ],
)
def test_config_errors(build, match):
    with pytest.raises(PlanError, match=match) as e:
        build()
    assert e.value.code == "plan.invalid"


def test_make_strategy_builds_each_config():
    assert make_strategy("fedavg", weighting="uniform") == FedAvgConfig(weighting="uniform")
    assert make_strategy("fedbn") == FedBNConfig()
    assert make_strategy("median") == MedianConfig()
    assert make_strategy("trimmed_mean", {"trim_fraction": 0.25}).trim_fraction == 0.25
    adam = make_strategy("fedyogi", {"eta": 1, "tau": 1e-2})
    assert adam == ServerOptConfig(optimiser="fedyogi", eta=1.0, tau=0.01)


@pytest.mark.parametrize(
    ("aggregation", "kwargs", "match"),
    [
        ("median", {"secure_aggregation": True}, "median cannot be computed under secure agg"),
        ("trimmed_mean", {"secure_aggregation": True}, "only ever sees the sum"),
        ("median", {"compression": "topk"}, "does not work with top-k compression"),
        ("trimmed_mean", {"compression": "topk"}, "most sites report 0"),
        ("fedbn", {"norm_layers": set()}, "this model has none"),
        ("fedbn", {"norm_layers": False}, "would be plain FedAvg"),
        ("median", {"min_updates": 2}, "median of 2 update.* resists no bad site"),
        ("trimmed_mean", {"min_updates": 9}, r"0.1-trimmed mean of 9 updates trims nothing.*10"),
        (TrimmedMeanConfig(trim_fraction=0.25), {"min_updates": 3}, "at least 4"),
        ("fedsgd", {}, "'aggregation' must be one of"),
    ],
)
def test_validate_strategy_refuses_with_a_reason(aggregation, kwargs, match):
    args = {"secure_aggregation": False, "compression": None, **kwargs}
    with pytest.raises(PlanError, match=match) as e:
        validate_strategy(aggregation, **args)
    assert e.value.code == "plan.invalid"


def test_validate_strategy_accepts_workable_combinations():
    for name in ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"):
        validate_strategy(name, secure_aggregation=True, compression="topk")
    validate_strategy("fedbn", secure_aggregation=True, compression="int8", norm_layers={"bn.w"})
    validate_strategy("fedbn", secure_aggregation=False, compression=None, norm_layers=True)
    validate_strategy("median", secure_aggregation=False, compression="int8", min_updates=3)
    validate_strategy("trimmed_mean", secure_aggregation=False, compression=None, min_updates=10)


def test_fedavg_weight_errors():
    with pytest.raises(UpdateError, match="one sample count per update") as e:
        fedavg(TWO, [1])
    assert e.value.code == "update.weight"
    with pytest.raises(UpdateError, match="not a positive finite number") as e:
        fedavg(TWO, [1, 0])
    assert e.value.code == "update.weight"


@pytest.mark.parametrize("optimiser", ["fedadam", "fedyogi", "fedadagrad"])
def test_server_optimisers_average_normalisation_statistics_plainly(optimiser):
    """Running means and variances are the data's moments: they take the plain FedAvg step
    (global + mean delta), while the layer's weights take the optimiser's step."""
    config = ServerOptConfig(optimiser=optimiser, eta=0.01, tau=1e-3)
    weights = {
        "bn.weight": np.ones(3, np.float32),
        "bn.running_mean": np.zeros(3, np.float32),
        "bn.running_var": np.ones(3, np.float32),
    }
    delta = {name: np.full(3, 0.5, np.float32) for name in weights}
    state = initial_state(weights, config)
    new, after = server_step(weights, delta, state, config)
    np.testing.assert_array_equal(new["bn.running_mean"], np.full(3, 0.5, np.float32))
    np.testing.assert_array_equal(new["bn.running_var"], np.full(3, 1.5, np.float32))
    assert np.all(np.abs(new["bn.weight"] - 1.0) < 0.5)  # an eta-sized optimiser step
    np.testing.assert_array_equal(after.m["bn.running_var"], state.m["bn.running_var"])


def test_fedbn_with_server_momentum_by_hand():
    config = make_strategy("fedbn", {"server_momentum": 0.5}, weighting="uniform")
    assert isinstance(config, FedBNConfig) and config.server_momentum == 0.5
    optimiser = server_optimiser(config)
    assert optimiser is not None and optimiser.eta == 1.0 and optimiser.beta1 == 0.5
    assert server_optimiser(FedBNConfig()) is None and server_optimiser(FedAvgConfig()) is None
    glob = upd(conv=[0, 0], **{"bn.weight": [1]})
    state = initial_state({"conv": glob["conv"]}, optimiser)
    # round 1: m = 0.5 * 0 + [2, -1] = [2, -1], w = [0, 0] + m = [2, -1]
    new, state = apply_aggregate(config, glob, upd(conv=[2, -1]), state)
    np.testing.assert_array_equal(new["conv"], [2, -1])
    # round 2: m = 0.5 * [2, -1] + [2, 1] = [3, 0.5], w = [2, -1] + m = [5, -0.5]
    new, state = apply_aggregate(config, new, upd(conv=[2, 1]), state)
    np.testing.assert_array_equal(new["conv"], [5, -0.5])
    np.testing.assert_array_equal(new["bn.weight"], [1])  # local layers: never moved
    assert state is not None and state.step == 2
    with pytest.raises(PlanError, match="'server_momentum' must be a number in \\[0, 1\\)"):
        make_strategy("fedbn", {"server_momentum": 1.0})
    with pytest.raises(PlanError, match="has no setting\\(s\\) 'eta'"):
        make_strategy("fedbn", {"eta": 1.0})
