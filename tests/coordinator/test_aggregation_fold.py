"""Folding updates into the round's mean as they are checked (``RoundFold``): the aggregate is
bit for bit the one computed from the blob files, whatever was folded and in which order, and a
fold that does not match the round's updates is not used."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from coordinator.aggregation import (
    RoundFold,
    _encoded_sum,
    aggregate_round,
    check_update,
    fold_stored,
    fold_weights,
)
from coordinator.blobs import PARALLEL_HASH_BYTES, BlobStore
from coordinator.store import UpdateRecord
from shared.aggregation import FedAvgAccumulator, layout_of, make_strategy, upload_layout
from shared.tensors import encode_tensors

SAMPLES = (3, 10, 17)


@pytest.fixture
def round_(tmp_path: Path) -> tuple[BlobStore, str, dict[str, np.ndarray], list[UpdateRecord]]:
    rng = np.random.default_rng(5)
    base = {
        "w": rng.standard_normal((40, 30)).astype(np.float32),
        "b": rng.standard_normal(30).astype(np.float32),
    }
    blobs = BlobStore(tmp_path / "blobs")
    model = blobs.put(encode_tensors(base))
    updates = []
    for i, n in enumerate(SAMPLES):
        delta = {
            k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()
        }
        updates.append(
            UpdateRecord("run", 1, f"site-{i}", blobs.put(encode_tensors(delta)), n, 0.5, 1.0)
        )
    return blobs, model, base, updates


def _fold(blobs: BlobStore, model: str, base: dict[str, np.ndarray], strategy, counts, checked):
    layout = upload_layout(strategy, layout_of(base))
    raw = fold_weights(strategy, counts)
    assert raw is not None
    fold = RoundFold(layout, raw)
    for u in checked:
        check_update(
            blobs.path(u.digest),
            blobs,
            model,
            None,
            layout=layout,
            fold=(fold, u.site_id, u.digest),
        )
    return fold


@pytest.mark.parametrize("weighting", ["samples", "uniform"])
def test_any_part_folded_in_any_order_gives_the_same_bytes(round_, weighting: str) -> None:
    blobs, model, base, updates = round_
    strategy = make_strategy("fedavg", {}, weighting=weighting)
    expected = aggregate_round(blobs, model, updates, strategy).model
    counts = {u.site_id: u.num_samples for u in updates}
    for k in range(len(updates) + 1):
        for checked in itertools.permutations(updates, k):
            fold = _fold(blobs, model, base, strategy, counts, checked)
            assert aggregate_round(blobs, model, updates, strategy, fold=fold).model == expected


def test_updates_stored_before_the_fold_was_made_are_folded_from_disk(round_) -> None:
    blobs, model, base, updates = round_
    strategy = make_strategy("fedavg", {}, weighting="samples")
    expected = aggregate_round(blobs, model, updates, strategy).model
    counts = {u.site_id: u.num_samples for u in updates}
    fold = _fold(blobs, model, base, strategy, counts, updates[2:])
    layout = upload_layout(strategy, layout_of(base))
    damaged = blobs.path(updates[1].digest)
    good = damaged.read_bytes()
    damaged.write_bytes(good[:-4] + b"\0\0\0\0")
    assert fold_stored(fold, blobs, updates[:2], layout) == 1  # the damaged one is left out
    damaged.write_bytes(good)  # repaired: the aggregate reads it itself
    assert aggregate_round(blobs, model, updates, strategy, fold=fold).model == expected


def test_updates_this_process_checked_are_folded_from_their_mapping_with_the_same_bytes(
    round_,
) -> None:
    """An update hashed on arrival and checked moments ago is folded from its mapped file,
    not read and hashed again; the aggregate is bit for bit the same. A blob the process did
    not check is still checked against its digest (the damaged one is left out)."""
    blobs, model, base, updates = round_
    strategy = make_strategy("fedavg", {}, weighting="samples")
    expected = aggregate_round(blobs, model, updates, strategy).model
    counts = {u.site_id: u.num_samples for u in updates}
    layout = upload_layout(strategy, layout_of(base))
    fold = _fold(blobs, model, base, strategy, counts, updates[2:])
    damaged = blobs.path(updates[1].digest)
    good = damaged.read_bytes()
    damaged.write_bytes(good[:-4] + b"\0\0\0\0")
    checked = {updates[0].digest, "f" * 64}  # a digest with no blob is passed over
    assert fold_stored(fold, blobs, updates[:2], layout, checked=checked) == 1
    damaged.write_bytes(good)
    assert aggregate_round(blobs, model, updates, strategy, fold=fold).model == expected


def test_a_fold_made_for_other_sites_or_counts_is_not_used(round_) -> None:
    blobs, model, base, updates = round_
    strategy = make_strategy("fedavg", {}, weighting="samples")
    expected = aggregate_round(blobs, model, updates, strategy).model
    # Made before a fourth site joined, or with another count for one site.
    for counts in (
        {u.site_id: u.num_samples for u in updates[:2]},
        {**{u.site_id: u.num_samples for u in updates}, "site-3": 5},
        {**{u.site_id: u.num_samples for u in updates}, "site-0": 4},
    ):
        fold = _fold(blobs, model, base, strategy, counts, updates[:2])
        assert aggregate_round(blobs, model, updates, strategy, fold=fold).model == expected


def test_a_claimed_fold_takes_nothing_more_and_a_site_counts_once(round_) -> None:
    blobs, model, base, updates = round_
    strategy = make_strategy("fedavg", {}, weighting="samples")
    counts = {u.site_id: u.num_samples for u in updates}
    fold = _fold(blobs, model, base, strategy, counts, updates[:1])
    again = np.zeros(1)  # never looked at: the site is already in
    assert not fold.add(updates[0].site_id, updates[0].digest, {"w": again})
    layout = upload_layout(strategy, layout_of(base))
    claimed = fold.claim(layout, updates, "samples")
    assert claimed is not None and claimed[1] == {updates[0].site_id}
    assert not fold.add(updates[1].site_id, updates[1].digest, {"w": again})  # sealed


def test_strategies_without_a_weighted_mean_do_not_fold() -> None:
    assert fold_weights(make_strategy("median", {}), {"a": 3}) is None
    assert fold_weights(make_strategy("fedavg", {}, weighting="samples"), {"a": 3}) == {"a": 3.0}


@pytest.mark.parametrize("direct_io", [True, False])
def test_a_large_blob_is_hashed_while_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_io: bool
) -> None:
    """Written past the page cache, or (a system without direct I/O) through it."""
    if not direct_io:
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    blobs = BlobStore(tmp_path / "blobs")
    data = np.random.default_rng(0).bytes(PARALLEL_HASH_BYTES + 3)
    digest = blobs.put(data)
    assert blobs.get(digest) == data  # checks the digest
    assert blobs.put(data) == digest  # stored once
    assert list(blobs.partial.iterdir()) == []


def test_the_new_model_computed_in_its_encoded_buffer_is_the_general_encoding() -> None:
    """FedAvg's new weights go straight into the encoded model's buffer: the same bytes as
    adding the mean to the base and encoding, with entries no update carries (FedBN's local
    ones) kept; a model that is not all float32 takes the general path."""
    rng = np.random.default_rng(9)
    base = {
        "fc.weight": rng.standard_normal((7, 5)).astype(np.float32),
        "fc.bias": rng.standard_normal(7).astype(np.float32),
        "bn.running_mean": rng.standard_normal(5).astype(np.float32),  # kept, not averaged
    }
    layout = layout_of({k: v for k, v in base.items() if k.startswith("fc.")})
    acc = FedAvgAccumulator(layout, max_abs=16.0, max_total_weight=1.0 + 1e-9)
    for w in (0.25, 0.75):
        acc.add(
            {k: (0.1 * rng.standard_normal(v[0])).astype(np.float32) for k, v in layout.items()}, w
        )
    mean = acc.result()
    general = encode_tensors({k: base[k] + mean[k] if k in mean else base[k] for k in base})
    made = _encoded_sum(base, acc)
    assert isinstance(made, memoryview) and made.readonly
    assert bytes(made) == general

    wide = {**base, "fc.bias": base["fc.bias"].astype(np.float64)}  # encode_parts declines
    expected = encode_tensors({k: wide[k] + mean[k] if k in mean else wide[k] for k in wide})
    assert bytes(_encoded_sum(wide, acc)) == expected
