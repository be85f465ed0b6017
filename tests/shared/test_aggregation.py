"""FedAvg accumulator and update validation: maths, order independence, streaming, errors."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy as stn
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.aggregation import (
    BLOCK,
    FedAvgAccumulator,
    fedavg_reference,
    layout_of,
    validate_update,
)
from shared.errors import PlanError, UpdateError

SHAPES = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "fc.weight": (10, 36), "fc.bias": (10,)}
LAYOUT = {n: (s, "float32") for n, s in SHAPES.items()}


def make_update(seed: int, scale: float = 0.5, layout=LAYOUT) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        n: np.clip(rng.standard_normal(s) * scale, -1, 1).astype(dt)
        for n, (s, dt) in layout.items()
    }


def stream_in(acc: FedAvgAccumulator, update, weight, sizes=None, seed=0) -> float:
    data = stn.save(update)
    rng = np.random.default_rng(seed)
    stream = acc.begin(weight)
    pos = 0
    while pos < len(data):
        k = int(rng.integers(1, 4000)) if sizes is None else sizes
        stream.feed(data[pos : pos + k])
        pos += k
    return stream.finish()


def assert_close_to_reference(acc, updates, weights):
    got = acc.result()
    ref = fedavg_reference(updates, weights)
    for n in ref:
        assert got[n].dtype == np.float32 and got[n].shape == ref[n].shape
        assert np.max(np.abs(got[n] - ref[n])) <= acc.error_bound


# --- maths ---------------------------------------------------------------------------


def test_matches_float64_reference_for_fixed_inputs():
    updates = [make_update(s) for s in range(4)]
    weights = [10.0, 250.0, 3.0, 1000.0]
    acc = FedAvgAccumulator(LAYOUT, max_abs=1.0, max_total_weight=sum(weights))
    for u, w in zip(updates, weights, strict=True):
        acc.add(u, w)
    assert acc.count == 4 and acc.total_weight == sum(weights)
    assert acc.error_bound < 1e-6
    assert_close_to_reference(acc, updates, weights)


def test_identical_updates_give_the_identity():
    u = make_update(7)
    acc = FedAvgAccumulator(LAYOUT, max_abs=1.0, max_total_weight=3.0)
    for w in (0.5, 1.0, 1.5):
        acc.add(u, w)
    got = acc.result()
    for n in u:
        np.testing.assert_allclose(got[n], u[n], rtol=0, atol=acc.error_bound)


def test_uniform_weights_give_the_plain_mean():
    updates = [make_update(s) for s in range(5)]
    acc = FedAvgAccumulator(LAYOUT, max_abs=1.0, max_total_weight=5.0)
    for u in updates:
        acc.add(u, 1.0)
    got = acc.result()
    for n in SHAPES:
        mean = np.mean([u[n].astype(np.float64) for u in updates], axis=0)
        assert np.max(np.abs(got[n] - mean)) <= acc.error_bound


weights_st = st.lists(st.floats(0.01, 100.0), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(weights=weights_st, seed=st.integers(0, 2**32 - 1), data=st.data())
def test_matches_reference_order_independent_and_bounded(weights, seed, data):
    updates = [make_update(seed + i, scale=float(i % 3 + 1) / 4) for i in range(len(weights))]
    total = sum(weights)
    acc = FedAvgAccumulator(LAYOUT, max_abs=1.0, max_total_weight=total)
    for u, w in zip(updates, weights, strict=True):
        acc.add(u, w)
    assert_close_to_reference(acc, updates, weights)

    order = data.draw(st.permutations(range(len(weights))))
    other = FedAvgAccumulator(LAYOUT, max_abs=1.0, max_total_weight=total)
    for i in order:
        other.add(updates[i], weights[i])
    a, b = acc.result(), other.result()
    for n in SHAPES:
        assert a[n].tobytes() == b[n].tobytes()  # bit for bit
        lo = np.min([u[n] for u in updates], axis=0)
        hi = np.max([u[n] for u in updates], axis=0)
        assert np.all(a[n] >= lo - acc.error_bound) and np.all(a[n] <= hi + acc.error_bound)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), chunk=st.integers(1, 5000))
def test_streaming_in_any_chunks_equals_add(seed, chunk):
    layout = dict(LAYOUT, half=((7, 3), "float16"), double=((5,), "float64"))
    updates = [make_update(seed + i, layout=layout) for i in range(3)]
    a = FedAvgAccumulator(layout, max_abs=1.0, max_total_weight=6.0, max_norm=1e6)
    b = FedAvgAccumulator(layout, max_abs=1.0, max_total_weight=6.0, max_norm=1e6)
    c = FedAvgAccumulator(layout, max_abs=1.0, max_total_weight=6.0)  # no norm bound
    for i, u in enumerate(updates):
        norm_a = a.add(u, i + 1.0)
        norm_b = stream_in(b, u, i + 1.0, sizes=chunk if i == 0 else None, seed=seed + i)
        assert norm_a == pytest.approx(validate_update(u, layout), rel=1e-5)
        assert norm_a == pytest.approx(norm_b, rel=1e-5)
        assert stream_in(c, u, i + 1.0, sizes=chunk, seed=seed) is None
    assert a._acc.tobytes() == b._acc.tobytes() == c._acc.tobytes()
    assert a.result().keys() == b.result().keys()


def test_norm_is_computed_only_with_a_norm_bound():
    u = make_update(4)
    want = validate_update(u, LAYOUT)
    unbounded = FedAvgAccumulator(LAYOUT, max_abs=1.0, max_total_weight=2.0)
    assert unbounded.add(u, 1.0) is None
    assert stream_in(unbounded, u, 1.0) is None
    bounded = FedAvgAccumulator(LAYOUT, max_abs=1.0, max_total_weight=2.0, max_norm=want * 2)
    assert bounded.add(u, 1.0) == pytest.approx(want, rel=1e-6)
    assert stream_in(bounded, u, 1.0) == pytest.approx(want, rel=1e-5)
    assert unbounded._acc.tobytes() == bounded._acc.tobytes()


def test_tensors_larger_than_a_block_stream_correctly():
    layout = {"big": ((BLOCK * 2 + 3,), "float32"), "small": ((5,), "float32")}
    updates = [make_update(s, layout=layout) for s in range(2)]
    acc = FedAvgAccumulator(layout, max_abs=1.0, max_total_weight=2.0)
    for i, u in enumerate(updates):
        stream_in(acc, u, 1.0, sizes=100_003 if i else None, seed=i)
    assert_close_to_reference(acc, updates, [1.0, 1.0])


# --- validation errors ----------------------------------------------------------------


def test_validate_returns_the_l2_norm():
    u = make_update(1)
    want = np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in u.values()))
    assert validate_update(u, layout_of(u)) == pytest.approx(want, rel=1e-6)
    assert layout_of(u) == LAYOUT


def test_keys_error_lists_missing_and_extra():
    u = make_update(1)
    del u["fc.bias"]
    u["extra"] = np.zeros(2, np.float32)
    with pytest.raises(UpdateError, match=r"missing 1 tensor.*'fc.bias'.*unexpected.*'extra'") as e:
        validate_update(u, LAYOUT)
    assert e.value.code == "update.keys"


def test_shape_dtype_nonfinite_range_norm_errors():
    cases = []
    u = make_update(1)
    u["fc.bias"] = np.zeros(11, np.float32)
    cases.append((u, {}, "update.shape", r"'fc.bias' has shape \(11,\)"))
    u = make_update(1)
    u["fc.bias"] = u["fc.bias"].astype(np.float64)
    cases.append((u, {}, "update.dtype", r"'fc.bias' has dtype float64"))
    u = make_update(1)
    u["conv.weight"][1, 2, 0, 0] = np.inf
    cases.append((u, {}, "update.nonfinite", r"'conv.weight' holds infinite"))
    u = make_update(1)
    u["fc.weight"][3, 3] = -5.0
    cases.append(
        (u, {"max_abs": 2.0}, "update.range", r"'fc.weight'.*magnitude 5, beyond the allowed 2\.")
    )
    cases.append((make_update(1), {"max_norm": 0.5}, "update.norm", r"L2 norm is .* bound 0.5"))
    for update, kw, code, pattern in cases:
        with pytest.raises(UpdateError, match=pattern) as e:
            validate_update(update, LAYOUT, **kw)
        assert e.value.code == code


def test_add_rejects_invalid_update_without_touching_the_sum():
    acc = FedAvgAccumulator(LAYOUT, max_abs=1.0, max_total_weight=2.0)
    acc.add(make_update(1), 1.0)
    before = acc._acc.copy()
    bad = make_update(2)
    bad["fc.bias"][-1] = np.nan
    with pytest.raises(UpdateError, match=r"'fc.bias' holds NaN") as e:
        acc.add(bad, 1.0)
    assert e.value.code == "update.nonfinite"
    assert np.array_equal(acc._acc, before) and acc.count == 1


def test_an_update_checked_by_the_caller_is_folded_without_a_second_scan():
    """``checked_abs`` within ``max_abs`` (the coordinator's receipt check): the same sum,
    names, shapes and dtypes still checked; a looser bound, or a norm bound, scans again."""
    updates = [make_update(s) for s in range(3)]
    plain = FedAvgAccumulator(LAYOUT, max_abs=1.0, max_total_weight=3.0)
    trusted = FedAvgAccumulator(LAYOUT, max_abs=1.0, max_total_weight=3.0)
    for u in updates:
        plain.add(u, 1.0)
        trusted.add(u, 1.0, checked_abs=1.0)
    assert np.array_equal(trusted._acc, plain._acc)
    assert all(np.array_equal(trusted.result()[n], plain.result()[n]) for n in LAYOUT)

    acc = FedAvgAccumulator(LAYOUT, max_abs=1.0, max_total_weight=3.0)
    misshapen = {**make_update(4), "fc.bias": np.zeros(9, np.float32)}
    with pytest.raises(UpdateError) as e:
        acc.add(misshapen, 1.0, checked_abs=1.0)
    assert e.value.code == "update.shape"
    loose = make_update(5)
    loose["fc.bias"][0] = 1.5
    with pytest.raises(UpdateError) as e:
        acc.add(loose, 1.0, checked_abs=2.0)  # checked against more than this sum allows
    assert e.value.code == "update.range"
    bounded = FedAvgAccumulator(LAYOUT, max_abs=1.0, max_total_weight=3.0, max_norm=0.01)
    with pytest.raises(UpdateError) as e:
        bounded.add(make_update(6), 1.0, checked_abs=1.0)  # the norm is still computed
    assert e.value.code == "update.norm"
    assert acc.count == 0 and bounded.count == 0


def test_weight_errors():
    acc = FedAvgAccumulator(LAYOUT, max_abs=1.0, max_total_weight=2.0)
    for w, pattern in (
        (0.0, "not a positive"),
        (float("nan"), "not a positive"),
        (2.5, "beyond this accumulator's max_total_weight"),
    ):
        with pytest.raises(UpdateError, match=pattern) as e:
            acc.add(make_update(1), w)
        assert e.value.code == "update.weight"


def test_empty_accumulator_has_no_result():
    with pytest.raises(UpdateError, match="No update has been added") as e:
        FedAvgAccumulator(LAYOUT).result()
    assert e.value.code == "update.empty"


def test_integer_layout_is_refused():
    with pytest.raises(PlanError, match="num_batches_tracked"):
        FedAvgAccumulator({"bn.num_batches_tracked": ((), "int64")})


# --- streaming errors leave the accumulator unchanged ---------------------------------


def _prepared():
    acc = FedAvgAccumulator(LAYOUT, max_abs=1.0, max_total_weight=3.0, max_norm=20.0)
    acc.add(make_update(1), 1.0)
    return acc, acc._acc.copy()


def _expect_stream_error(data: bytes, code: str, pattern: str, chunk: int = 97, finish=True):
    acc, before = _prepared()
    stream = acc.begin(1.0)
    with pytest.raises(UpdateError, match=pattern) as e:
        for pos in range(0, len(data), chunk):
            stream.feed(data[pos : pos + chunk])
        if finish:
            stream.finish()
    assert e.value.code == code
    assert acc._acc.tobytes() == before.tobytes() and acc.count == 1
    acc.add(make_update(3), 1.0)  # the accumulator stays usable
    assert acc.count == 2
    with pytest.raises(UpdateError, match="already aborted"):
        stream.feed(b"x")


def test_stream_nan_in_last_chunk_rolls_back_bit_identically():
    u = make_update(2)
    u["fc.bias"][-1] = np.nan  # fc.bias is stored last in the safetensors data
    data = stn.save(u)
    _expect_stream_error(data, "update.nonfinite", r"'fc.bias' holds NaN", chunk=len(data) - 3)


def test_stream_errors_for_keys_shape_dtype_range_norm():
    u = make_update(2)
    u["other"] = u.pop("conv.bias")
    _expect_stream_error(stn.save(u), "update.keys", r"missing.*'conv.bias'")
    u = make_update(2)
    u["fc.weight"] = np.zeros((36, 10), np.float32)
    _expect_stream_error(stn.save(u), "update.shape", r"'fc.weight' has shape \(36, 10\)")
    u = make_update(2)
    u["conv.bias"] = u["conv.bias"].astype(np.float16)
    _expect_stream_error(stn.save(u), "update.dtype", r"'conv.bias' has dtype float16")
    u = make_update(2)
    u["fc.weight"][9, 35] = 1.5
    _expect_stream_error(stn.save(u), "update.range", r"magnitude 1.5, beyond the allowed 1\.")
    u = {n: np.full(s, 0.999, np.float32) for n, s in SHAPES.items()}
    acc_norm = np.sqrt(sum(np.prod(s) for s in SHAPES.values())) * 0.999
    assert acc_norm > 20.0
    _expect_stream_error(stn.save(u), "update.norm", r"L2 norm is .* bound 20")


def test_stream_truncated_garbage_and_overlong():
    data = stn.save(make_update(2))
    _expect_stream_error(
        data[:-5], "update.truncated", rf"after {len(data) - 5} bytes of {len(data)}"
    )
    _expect_stream_error(data[:5], "update.truncated", "inside its header")
    _expect_stream_error(
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
        "update.header",
        "not valid UTF-8 JSON",
        finish=False,
    )
    _expect_stream_error(b"\xff" * 8, "update.header", "header claims", finish=False)
    _expect_stream_error(
        data + b"\x00" * 4, "update.size", "more bytes than its header", finish=False
    )


def test_abort_and_context_manager_roll_back():
    acc, before = _prepared()
    data = stn.save(make_update(5))
    stream = acc.begin(1.0)
    stream.feed(data[: len(data) // 2])
    assert acc._acc.tobytes() != before.tobytes()  # folded as it arrived
    with pytest.raises(UpdateError, match="still open") as e:
        acc.result()
    assert e.value.code == "update.pending"
    stream.abort()
    stream.abort()  # idempotent
    assert acc._acc.tobytes() == before.tobytes() and acc.count == 1
    with acc.begin(1.0) as s:
        s.feed(bytearray(data[:-1]))  # mutable buffer: copied, then rolled back
    assert acc._acc.tobytes() == before.tobytes()
    with acc.begin(1.0) as s:
        s.feed(data)
        s.finish()
    assert acc.count == 2
    with pytest.raises(UpdateError, match="already committed"):
        s.abort()


def test_torch_kernel_is_bit_identical_to_the_numpy_fold():
    """Float32 pieces go through torch; undo and other dtypes through numpy: same integers."""
    layout = {"w": ((3 * (1 << 18) + 11,), "float32")}
    x = np.random.default_rng(7).standard_normal(layout["w"][0][0]).astype(np.float32)
    fast = FedAvgAccumulator(layout, max_abs=16.0, max_total_weight=1.0)
    slow = FedAvgAccumulator(layout, max_abs=16.0, max_total_weight=1.0)
    stream = fast.begin(0.37)
    stream.feed(stn.save({"w": x}))
    stream.finish()
    e = fast._effective[0]
    slow._fold(x, 0, np.float32(e), +1)
    assert np.array_equal(fast._acc, slow._acc)
    assert np.any(fast._acc != 0)
