"""What arrives on the wire under issue 6: FedBN updates without normalisation layers, and
updates in the plan's codec, checked at receipt and aggregated from a real blob store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.aggregation import aggregate_round, check_update, decode_update
from coordinator.blobs import BlobStore
from coordinator.store import UpdateRecord
from shared.aggregation import fedavg, layout_of, make_strategy, upload_layout
from shared.compression import get_codec
from shared.errors import UpdateError
from shared.tensors import decode_tensors, encode_tensors

COUNTS = (10, 30, 20)
BN = ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")


def _base() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    out = {"conv.weight": rng.normal(size=(4, 3)).astype(np.float32)}
    out |= {name: rng.normal(size=(4,)).astype(np.float32) for name in BN}
    return out


def _deltas(names, n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    base = _base()
    return [
        {k: (0.05 * rng.normal(size=base[k].shape)).astype(np.float32) for k in names}
        for _ in range(n)
    ]


def _put(blobs: BlobStore, payloads: list[bytes]) -> list[UpdateRecord]:
    return [
        UpdateRecord("run", 1, f"site{i}", blobs.put(p), COUNTS[i], 0.5, 1.0)
        for i, p in enumerate(payloads)
    ]


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def test_fedbn_averages_shared_entries_and_keeps_the_models_norm_layers(blobs) -> None:
    base = _base()
    strategy = make_strategy("fedbn")
    layout = upload_layout(strategy, layout_of(base))
    assert set(layout) == {"conv.weight"}  # the normalisation layer stays at the sites
    deltas = _deltas(["conv.weight"])
    model_digest = blobs.put(encode_tensors(base))
    records = _put(blobs, [encode_tensors(d) for d in deltas])
    new = decode_tensors(aggregate_round(blobs, model_digest, records, strategy).model)
    mean = fedavg(deltas, COUNTS)
    np.testing.assert_array_equal(new["conv.weight"], base["conv.weight"] + mean["conv.weight"])
    for name in BN:  # what the global model carries: the initial values, untouched
        np.testing.assert_array_equal(new[name], base[name])


def test_an_update_carrying_a_norm_layer_is_refused_under_fedbn(tmp_path: Path, blobs) -> None:
    base = _base()
    layout = upload_layout(make_strategy("fedbn"), layout_of(base))
    path = tmp_path / "u.safetensors"
    path.write_bytes(encode_tensors(_deltas(list(base))[0]))
    with pytest.raises(UpdateError, match="unexpected tensor") as info:
        check_update(path, blobs, "", None, layout=layout)
    assert info.value.code == "update.keys"


@pytest.mark.parametrize("name", ["int8+zstd", "fp16", "topk:0.5+zstd"])
def test_updates_in_the_plans_codec_are_checked_and_aggregated_decoded(
    tmp_path: Path, blobs, name: str
) -> None:
    codec = get_codec(name)
    base = _base()
    layout = layout_of(base)
    deltas = _deltas(list(base))
    payloads = [codec.encode(d) for d in deltas]
    path = tmp_path / "u.bin"
    path.write_bytes(payloads[0])
    decoded = [decode_update(p, layout, codec) for p in payloads]
    norm = check_update(path, blobs, "", None, layout=layout, codec=codec)
    assert norm == pytest.approx(np.sqrt(sum(float(np.sum(a**2)) for a in decoded[0].values())))
    model_digest = blobs.put(encode_tensors(base))
    strategy = make_strategy("fedavg")
    result = aggregate_round(blobs, model_digest, _put(blobs, payloads), strategy, codec=codec)
    mean = fedavg(decoded, COUNTS)  # exactly what the site's bytes say, nothing else
    new = decode_tensors(result.model)
    for key in base:
        np.testing.assert_array_equal(new[key], base[key] + mean[key])
    # a plain update where the plan says int8 is refused, with the reason
    path.write_bytes(encode_tensors(deltas[0]))
    with pytest.raises(UpdateError) as info:
        check_update(path, blobs, "", None, layout=layout, codec=codec)
    assert info.value.code in ("update.codec", "update.malformed")


def test_fedbn_with_server_momentum_keeps_its_state_between_rounds(blobs) -> None:
    base = _base()
    strategy = make_strategy("fedbn", {"server_momentum": 0.5})
    deltas = _deltas(["conv.weight"])
    mean = fedavg(deltas, COUNTS)["conv.weight"]
    digest = blobs.put(encode_tensors(base))
    first = aggregate_round(
        blobs, digest, _put(blobs, [encode_tensors(d) for d in deltas]), strategy
    )
    assert first.opt_state is not None  # the velocity, stored and recorded with the round
    after1 = decode_tensors(first.model)
    np.testing.assert_allclose(after1["conv.weight"], base["conv.weight"] + mean, atol=1e-6)
    # round 2 with the same updates: velocity 0.5 * mean + mean
    digest2 = blobs.put(first.model)
    second = aggregate_round(
        blobs,
        digest2,
        _put(blobs, [encode_tensors(d) for d in deltas]),
        strategy,
        blobs.put(first.opt_state),
    )
    after2 = decode_tensors(second.model)
    np.testing.assert_allclose(after2["conv.weight"], after1["conv.weight"] + 1.5 * mean, atol=1e-6)
    for name in BN:
        np.testing.assert_array_equal(after2[name], base[name])
