"""Update codecs: round trips with per-codec error bounds, byte sizes, error feedback, and
hostile inputs (garbage, truncation, zip bombs) that must raise only UpdateError."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.compression import (
    KNOWN,
    Compressed,
    ErrorFeedback,
    Fp16,
    Int8,
    NoCompression,
    TopK,
    get_codec,
    keep_count,
)
from shared.compression.codecs import TAG_KEY
from shared.errors import PlanError, UpdateError
from shared.tensors import encode_tensors

ALL_NAMES = [
    "none",
    "fp16",
    "int8",
    "topk:0.01",
    "topk:0.25+int8",
    "none+zstd",
    "fp16+zstd",
    "int8+zstd",
    "topk:0.01+zstd",
    "topk:0.25+int8+zstd",
]


def layout_of(update: dict[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {n: (a.shape, "float32") for n, a in update.items()}


def small_update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(0, 0.01, (8, 4, 3, 3)).astype(np.float32),
        "fc.bias": rng.normal(0, 0.01, 10).astype(np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }


def realistic_update() -> dict[str, np.ndarray]:
    """About 1M parameters of Gaussian noise with standard deviation 0.01."""
    rng = np.random.default_rng(1234)
    shapes = {
        "features.0.weight": (64, 3, 7, 7),
        "features.4.weight": (256, 256, 3, 3),
        "classifier.weight": (400, 1000),
        "classifier.bias": (1000,),
        "norm.weight": (256,),
    }
    return {n: rng.normal(0, 0.01, s).astype(np.float32) for n, s in shapes.items()}


finite32 = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)
updates = st.dictionaries(
    st.sampled_from(["a", "b.weight", "c/d", "values/x", "é"]),
    hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=0, max_dims=3, max_side=40), elements=finite32
    ),
    min_size=1,
    max_size=3,
)


# --- round trips ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(updates, st.sampled_from(ALL_NAMES))
def test_round_trip_keeps_names_shapes_dtype(update, name):
    codec = get_codec(name)
    out = codec.decode(codec.encode(update), layout_of(update))
    assert set(out) == set(update)
    for n, a in update.items():
        assert out[n].shape == a.shape and out[n].dtype == np.float32
    assert codec.encode(update) == codec.encode(update)  # deterministic bytes


@settings(max_examples=60, deadline=None)
@given(updates)
def test_none_is_exact_and_plain_safetensors(update):
    data = NoCompression().encode(update)
    assert data == encode_tensors(update)
    out = NoCompression().decode(data, layout_of(update))
    for n, a in update.items():
        np.testing.assert_array_equal(out[n], a)


@settings(max_examples=60, deadline=None)
@given(updates)
def test_fp16_relative_error(update):
    out = Fp16().decode(Fp16().encode(update), layout_of(update))
    for n, a in update.items():
        x, y = a.astype(np.float64), out[n].astype(np.float64)
        bound = np.maximum(2.0**-11 * np.abs(x), 2.0**-25)
        assert np.all(np.abs(x - y) <= bound)


@settings(max_examples=60, deadline=None)
@given(updates, st.sampled_from([1, 7, 256]))
def test_int8_error_at_most_half_a_scale(update, block):
    codec = Int8(block)
    out = codec.decode(codec.encode(update), layout_of(update))
    for n, a in update.items():
        x = a.reshape(-1).astype(np.float64)
        y = out[n].reshape(-1).astype(np.float64)
        blocks = math.ceil(x.size / block)
        padded = np.zeros(blocks * block)
        padded[: x.size] = np.abs(x)
        scale = np.repeat(padded.reshape(blocks, block).max(axis=1) / 127, block)[: x.size]
        # scale/2 from rounding to the int8 grid, plus float32 rounding of the decoded product
        # (and of the scale, rounded up to float32); among subnormals float32 rounding is
        # absolute: at most one smallest subnormal (2**-149).
        bound = scale / 2 * (1 + 2.0**-22) + 2.0**-24 * np.abs(y) + 2.0**-149
        assert np.all(np.abs(x - y) <= bound)


def test_int8_tiny_and_subnormal_blocks_never_clip():
    x = np.array([1.4e-45, -2.7e-43, 3e-39, 0.0] * 64 + [1e-30] * 3, np.float32)
    out = Int8().decode(Int8().encode({"t": x}), {"t": (x.shape, "float32")})["t"]
    assert np.all(np.abs(out.astype(np.float64) - x) <= np.abs(x).max() / 127 / 2 + 1e-45)


@settings(max_examples=60, deadline=None)
@given(updates, st.sampled_from([0.01, 0.1, 0.5, 1.0]))
def test_topk_exact_on_kept_entries_zero_elsewhere(update, fraction):
    codec = TopK(fraction)
    out = codec.decode(codec.encode(update), layout_of(update))
    for n, a in update.items():
        x, y = a.reshape(-1), out[n].reshape(-1)
        kept = np.flatnonzero(y)
        np.testing.assert_array_equal(y[kept], x[kept])
        k = keep_count(x.size, fraction)
        # Exactly k entries were chosen (zeros may be among them): every dropped magnitude is
        # at most every kept one.
        assert kept.size <= k
        if x.size and k < x.size:
            chosen = np.sort(np.abs(x))[::-1][:k]
            dropped = np.abs(x[y == 0])
            assert dropped.size == 0 or dropped.max() <= chosen.min()


def test_topk_ties_go_to_the_lower_index():
    x = np.array([1, -2, 2, 0, 2, -2], np.float32)
    out = TopK(0.5).decode(TopK(0.5).encode({"t": x}), {"t": ((6,), "float32")})["t"]
    np.testing.assert_array_equal(out, [0, -2, 2, 0, 2, 0])


# --- sizes ---------------------------------------------------------------------------------


def test_byte_ratios_on_a_realistic_update():
    update = realistic_update()
    layout = layout_of(update)
    raw = sum(a.nbytes for a in update.values())
    assert 0.9e6 < raw / 4 < 1.2e6
    ratios = {}
    for name in ["none", "fp16", "int8", "topk:0.01", "topk:0.01+int8"]:
        for full in (name, name + "+zstd"):
            codec = get_codec(full)
            data = codec.encode(update)
            assert len(data) <= codec.max_payload_size(layout)
            ratios[full] = len(data) / raw
    print("byte ratios vs raw fp32:", {k: round(v, 4) for k, v in ratios.items()})
    assert ratios["int8+zstd"] <= 0.30
    assert 0.45 <= ratios["fp16"] <= 0.51
    assert ratios["topk:0.01"] <= 0.021
    assert ratios["topk:0.01+int8+zstd"] <= 0.013


# --- error feedback ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["topk:0.05", "topk:0.05+int8+zstd", "int8"])
def test_error_feedback_conserves_the_sum(name):
    codec = get_codec(name)
    rng = np.random.default_rng(7)
    layout = {"w": ((30, 20), "float32"), "b": ((20,), "float32")}
    feedback = ErrorFeedback(layout)
    total_in = {n: np.zeros(s) for n, (s, _) in layout.items()}
    total_sent = {n: np.zeros(s) for n, (s, _) in layout.items()}
    for _ in range(12):
        update = {n: rng.normal(0, 0.01, s).astype(np.float32) for n, (s, _) in layout.items()}
        sent = codec.decode(feedback.compress(update, codec), layout)
        for n in layout:
            total_in[n] += update[n]
            total_sent[n] += sent[n]
    residual = feedback.residual
    for n in layout:
        np.testing.assert_allclose(total_sent[n] + residual[n], total_in[n], rtol=0, atol=1e-7)
        assert np.abs(residual[n]).max() > 0


def test_error_feedback_residual_survives_a_restart():
    layout = {"w": ((50,), "float32")}
    feedback = ErrorFeedback(layout)
    feedback.compress({"w": np.linspace(-1, 1, 50, dtype=np.float32)}, TopK(0.1))
    restored = ErrorFeedback.from_bytes(feedback.to_bytes(), layout)
    np.testing.assert_array_equal(restored.residual["w"], feedback.residual["w"])
    with pytest.raises(UpdateError, match="global model's is") as info:
        ErrorFeedback.from_bytes(feedback.to_bytes(), {"w": ((49,), "float32")})
    assert info.value.code == "update.shape"
    with pytest.raises(UpdateError, match="malformed") as info:
        ErrorFeedback.from_bytes(b"garbage", layout)
    assert info.value.code == "update.malformed"


# --- hostile inputs ------------------------------------------------------------------------

SMALL_LAYOUT = layout_of(small_update())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(ALL_NAMES))
def test_random_bytes_raise_only_update_error(data, name):
    with pytest.raises(UpdateError, match=r"."):
        get_codec(name).decode(data, SMALL_LAYOUT)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ALL_NAMES), st.data())
def test_mutated_payloads_raise_only_update_error(name, data):
    codec = get_codec(name)
    payload = bytearray(codec.encode(small_update()))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    try:
        out = codec.decode(bytes(payload[:cut]), SMALL_LAYOUT)
    except UpdateError:
        return
    assert all(np.isfinite(a).all() for a in out.values())  # a flip in the values may decode


@pytest.mark.parametrize("name", ALL_NAMES)
def test_truncated_payload_is_malformed(name):
    codec = get_codec(name)
    payload = codec.encode(small_update())
    with pytest.raises(UpdateError, match="malformed") as info:
        codec.decode(payload[:-3], SMALL_LAYOUT)
    assert info.value.code == "update.malformed"


def test_zip_bomb_is_too_large():
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * 50_000_000)
    assert len(bomb) < 10_000
    with pytest.raises(UpdateError, match="more than the") as info:
        get_codec("int8+zstd").decode(bomb, SMALL_LAYOUT)
    assert info.value.code == "update.too_large"
    limited = Compressed(Int8(), max_output_size=100)
    with pytest.raises(UpdateError, match="more than the 100 bytes") as info:
        limited.decode(Compressed(Int8()).encode(small_update()), SMALL_LAYOUT)
    assert info.value.code == "update.too_large"


def test_zstd_frame_without_size_or_with_trailing_data_is_malformed():
    inner = Int8().encode(small_update())
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(inner)
    with pytest.raises(UpdateError, match="does not declare its size") as info:
        get_codec("int8+zstd").decode(unsized, SMALL_LAYOUT)
    assert info.value.code == "update.malformed"
    good = Compressed(Int8()).encode(small_update())
    with pytest.raises(UpdateError, match="corrupt or truncated"):
        get_codec("int8+zstd").decode(good + good, SMALL_LAYOUT)


def test_wrong_names_and_shapes():
    update = small_update()
    for name in ["none", "fp16", "int8", "topk:0.1+int8"]:
        codec = get_codec(name)
        data = codec.encode(update)
        with pytest.raises(UpdateError, match="missing 1 tensor") as info:
            codec.decode(data, {**SMALL_LAYOUT, "extra": ((2,), "float32")})
        assert info.value.code == "update.keys"
        wrong = {**SMALL_LAYOUT, "fc.bias": ((11,), "float32")}
        with pytest.raises(UpdateError, match=r"global model's is \(11,\)") as info:
            codec.decode(data, wrong)
        assert info.value.code == "update.shape"


def test_payload_of_another_codec_is_refused():
    data = Fp16().encode(small_update())
    with pytest.raises(UpdateError, match=r"written by codec 'fp16'.*plan uses 'int8;block=256'"):
        Int8().decode(data, SMALL_LAYOUT)
    with pytest.raises(UpdateError, match="written by codec 'none'") as info:
        Fp16().decode(NoCompression().encode(small_update()), SMALL_LAYOUT)
    assert info.value.code == "update.codec"


def _forge(arrays: dict[str, np.ndarray], tag: str) -> bytes:
    from shared.compression.codecs import pack

    return pack(arrays, tag)


def test_forged_values_are_refused():
    layout = {"t": ((4,), "float32")}
    nan16 = {"t": np.array([0, np.nan, 1, 2], np.float16)}
    with pytest.raises(UpdateError, match="NaN") as info:
        Fp16().decode(_forge(nan16, "fp16"), layout)
    assert info.value.code == "update.nonfinite"
    q = np.array([1, 2, 3, 4], np.int8)
    for scales, code, text in [
        (np.array([np.nan], np.float32), "update.nonfinite", "NaN"),
        (np.array([-1.0], np.float32), "update.malformed", "negative scale"),
        (np.array([3e38], np.float32), "update.range", "overflow float32"),
        (np.array([1, 1], np.float32), "update.malformed", "wrong dtype or count"),
    ]:
        data = _forge({"values/t": q, "scales/t": scales}, "int8;block=256")
        with pytest.raises(UpdateError, match=text) as info:
            Int8().decode(data, layout)
        assert info.value.code == code
    data = _forge(
        {"values/t": np.array([-128, 0, 0, 0], np.int8), "scales/t": np.ones(1, np.float32)},
        "int8;block=256",
    )
    with pytest.raises(UpdateError, match="-128"):
        Int8().decode(data, layout)
    for idx, text in [([2, 1], "not increasing"), ([1, 4], "not increasing"), ([[1, 2]], "vector")]:
        data = _forge(
            {"indices/t": np.array(idx, np.uint32), "values/t": np.ones(2, np.float32)},
            "topk:0.5",
        )
        with pytest.raises(UpdateError, match=text) as info:
            TopK(0.5).decode(data, layout)
        assert info.value.code == "update.malformed"
    data = _forge({"t": np.ones(4, np.float32)}, "fp16")
    with pytest.raises(UpdateError, match="arrived as float32") as info:
        Fp16().decode(data, layout)
    assert info.value.code == "update.dtype"
    assert TAG_KEY == "tessera.codec"


def test_encode_refuses_bad_updates():
    with pytest.raises(UpdateError, match="beyond float16's range") as info:
        Fp16().encode({"t": np.array([1e5], np.float32)})
    assert info.value.code == "update.range"
    for codec in [NoCompression(), Fp16(), Int8(), TopK(0.5)]:
        with pytest.raises(UpdateError, match="NaN") as info:
            codec.encode({"t": np.array([0.0, np.nan], np.float32)})
        assert info.value.code == "update.nonfinite"
    with pytest.raises(UpdateError, match="float arrays") as info:
        Int8().encode({"t": np.array([1, 2], np.int64)})
    assert info.value.code == "update.dtype"


# --- registry ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("none", NoCompression()),
        ("fp16+zstd", Compressed(Fp16())),
        ("int8", Int8()),
        ("int8;block=64", Int8(64)),
        ("topk:0.01", TopK(0.01)),
        ("topk:1", TopK(1.0)),
        ("topk:1e-3+int8+zstd", Compressed(TopK(0.001, int8_values=True))),
        ("topk:.5", TopK(0.5)),
    ],
)
def test_registry_parses_plan_names(name, expected):
    codec = get_codec(name)
    assert codec == expected
    assert get_codec(codec.name) == codec


@pytest.mark.parametrize(
    "name",
    ["", "gzip", "int8+zstd+zstd", "topk:", "topk:0", "topk:1.5", "topk:nan", "topk:-0.1",
     "topk: 0.1", "topk:0.1+fp16", "FP16", "zstd", "int8;block=0", "topk:1_0"],
)  # fmt: skip
def test_registry_refuses_unknown_names(name):
    with pytest.raises(PlanError, match="Known codecs: 'none', 'fp16', 'int8'") as info:
        get_codec(name)
    assert info.value.code == "plan.invalid"
    assert "topk:<fraction>" in str(info.value) and len(KNOWN) == 5


def test_constructors_refuse_bad_parameters():
    with pytest.raises(PlanError, match=r"fraction must be a number in \(0, 1\]"):
        TopK(0.0)
    with pytest.raises(PlanError, match="block size"):
        Int8(0)
    with pytest.raises(PlanError, match="zstd level"):
        Compressed(Int8(), level=99)
    with pytest.raises(PlanError, match="floating-point tensors only") as info:
        Int8().decode(b"", {"t": ((1,), "int64")})
    assert info.value.code == "plan.layout"
