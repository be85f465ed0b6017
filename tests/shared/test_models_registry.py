"""Model registry (deterministic builds) and model weights as arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.errors import PlanError, UpdateError
from shared.models import (
    array_layout,
    available_architectures,
    build_model,
    get_architecture,
    load_model_arrays,
    model_arrays,
)
from shared.models.registry import resolve_hyperparameters


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_available_architectures_lists_every_v1() -> None:
    assert available_architectures() == [
        ("densenet121", "1"),
        ("mlp", "1"),
        ("small_cnn", "1"),
        ("small_cnn_gn", "1"),
    ]
    assert get_architecture("small_cnn", "1").name == "small_cnn"


def test_same_seed_gives_bit_identical_weights() -> None:
    a = model_arrays(build_model("small_cnn", "1", seed=7))
    b = model_arrays(build_model("small_cnn", "1", seed=7))
    assert _same(a, b)


def test_different_seed_gives_different_weights() -> None:
    a = model_arrays(build_model("small_cnn", "1", seed=7))
    b = model_arrays(build_model("small_cnn", "1", seed=8))
    assert not _same(a, b)


def test_build_leaves_global_rng_untouched() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_model("small_cnn", "1", seed=99)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_architecture_lists_available() -> None:
    with pytest.raises(PlanError, match=r"Unknown architecture 'resnet50'.*small_cnn v1") as info:
        get_architecture("resnet50", "1")
    assert info.value.code == "plan.unknown_architecture"
    with pytest.raises(PlanError, match=r"version '2'.*densenet121 v1"):
        build_model("small_cnn", "2", seed=0)


def test_input_size_below_minimum_is_refused() -> None:
    with pytest.raises(PlanError, match="needs input_size >= 32"):
        build_model("small_cnn", "1", input_size=16, seed=0)


@pytest.mark.parametrize("size", [32, 64, 97])
def test_small_cnn_is_small_and_accepts_any_size_from_32(size: int) -> None:
    model = build_model("small_cnn", "1", input_size=size, seed=0).eval()
    assert 50_000 <= sum(p.numel() for p in model.parameters()) <= 100_000
    with torch.no_grad():
        assert model(torch.zeros(2, 1, size, size)).shape == (2, 1)


def test_densenet121_builds_and_runs_forward() -> None:
    model = build_model("densenet121", "1", in_channels=1, num_classes=1, seed=0).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, 1)
    assert torch.isfinite(out).all()


# --- weights as arrays -------------------------------------------------------------------


def test_model_arrays_are_float32_copies_without_integer_buffers() -> None:
    model = build_model("small_cnn", "1", seed=0)
    arrays = model_arrays(model)
    assert not any(k.endswith("num_batches_tracked") for k in arrays)
    assert "features.0.1.running_mean" in arrays  # float buffers are exchanged
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays.values())
    before = arrays["head.bias"].copy()
    with torch.no_grad():
        model.head.bias.add_(1.0)
    assert np.array_equal(arrays["head.bias"], before)


def test_load_model_arrays_round_trip() -> None:
    source = model_arrays(build_model("small_cnn", "1", seed=1))
    target = build_model("small_cnn", "1", seed=2)
    load_model_arrays(target, source)
    assert _same(model_arrays(target), source)


def test_load_model_arrays_rejects_missing_and_unexpected_keys() -> None:
    model = build_model("small_cnn", "1", seed=0)
    arrays = model_arrays(model)
    del arrays["head.bias"]
    arrays["extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(UpdateError, match=r"missing head\.bias; unexpected extra\.weight") as info:
        load_model_arrays(model, arrays)
    assert info.value.code == "update.keys"


def test_load_model_arrays_rejects_wrong_shape_without_partial_write() -> None:
    model = build_model("small_cnn", "1", seed=0)
    before = model_arrays(model)
    arrays = model_arrays(build_model("small_cnn", "1", seed=1))
    arrays["head.weight"] = np.zeros((2, 64), np.float32)
    with pytest.raises(UpdateError, match=r"'head\.weight' has shape \(2, 64\)") as info:
        load_model_arrays(model, arrays)
    assert info.value.code == "update.shape"
    assert _same(model_arrays(model), before)


def test_load_model_arrays_rejects_integer_arrays() -> None:
    model = build_model("small_cnn", "1", seed=0)
    arrays = model_arrays(model)
    arrays["head.bias"] = np.zeros(1, np.int64)
    with pytest.raises(UpdateError, match="expected a floating-point type"):
        load_model_arrays(model, arrays)


def test_array_layout() -> None:
    layout = array_layout(model_arrays(build_model("small_cnn", "1", seed=0)))
    assert layout["head.weight"] == ((1, 64), "float32")
    assert layout["features.0.0.weight"] == ((16, 1, 3, 3), "float32")


# --- settings a plan chooses (architecture_params) ----------------------------------------


@pytest.mark.parametrize(("width", "size"), [(1, 32), (7, 40), (300, 32)])
def test_the_mlp_has_exactly_the_size_its_width_gives(width: int, size: int) -> None:
    spec = get_architecture("mlp", "1")
    params = {"width": width}
    model = build_model("mlp", "1", input_size=size, params=params, seed=0).eval()
    count = sum(p.numel() for p in model.parameters())
    assert count == width * (size * size + 2) + 1
    assert spec.parameter_count is not None
    assert spec.parameter_count(1, 1, size, params) == count
    with torch.no_grad():
        assert model(torch.zeros(3, 1, size, size)).shape == (3, 1)


def test_the_mlp_is_deterministic_and_takes_the_default_width() -> None:
    a = model_arrays(build_model("mlp", "1", input_size=32, params={"width": 9}, seed=4))
    b = model_arrays(build_model("mlp", "1", input_size=32, params={"width": 9}, seed=4))
    assert _same(a, b)
    default = build_model("mlp", "1", input_size=32, seed=4)
    assert (
        default.hidden.out_features == get_architecture("mlp", "1").hyperparameters["width"].default
    )
    assert resolve_hyperparameters(get_architecture("mlp", "1"), {}, input_size=32) == {
        "width": 256
    }


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("small_cnn", {"width": 3}, r"small_cnn v1 has no setting 'width' \(its settings: none\)"),
        ("mlp", {"depth": 3}, r"mlp v1 has no setting 'depth' \(its settings: width\)"),
        ("mlp", {"width": 0}, r"setting 'width' \(hidden units\) must be an integer from 1"),
        ("mlp", {"width": 2.5}, r"must be an integer from 1 to \d+; got 2\.5"),
        ("mlp", {"width": True}, r"must be an integer .*; got True"),
        ("mlp", {"width": 1 << 20}, r"would have .* parameters, more than the 134,217,728"),
    ],
)
def test_settings_a_site_cannot_build_are_refused_before_building(
    name: str, params: dict, match: str
) -> None:
    with pytest.raises(PlanError, match=match) as info:
        build_model(name, "1", input_size=64, params=params, seed=0)
    assert info.value.code == "plan.invalid"
