"""``aggregate_round`` under each strategy, on hand-made updates in a real blob store, and the
server optimiser's state persisted across rounds and store restarts."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from coordinator.aggregation import aggregate_round
from coordinator.blobs import BlobStore
from coordinator.store import Store, UpdateRecord
from shared.aggregation import (
    ServerOptState,
    coordinate_median,
    fedavg,
    initial_state,
    make_strategy,
    server_step,
    trimmed_mean,
)
from shared.errors import PlanError, StorageError
from shared.plan import demo_plan
from shared.tensors import decode_tensors, encode_tensors

COUNTS = (10, 30, 20, 40, 25)


def _base() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "a.weight": rng.normal(size=(2, 3)).astype(np.float32),
        "b.bias": rng.normal(size=(4,)).astype(np.float32),
    }


def _updates(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {name: (0.1 * rng.normal(size=a.shape)).astype(np.float32) for name, a in _base().items()}
        for _ in range(n)
    ]


@pytest.fixture
def blobs(tmp_path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def _put(blobs: BlobStore, updates, rnd: int = 1) -> list[UpdateRecord]:
    return [
        UpdateRecord("run", rnd, f"site{i}", blobs.put(encode_tensors(u)), COUNTS[i], 0.5, 1.0)
        for i, u in enumerate(updates)
    ]


def _plus(base, delta) -> bytes:
    return encode_tensors({name: base[name] + delta[name] for name in base})


@pytest.mark.parametrize(
    ("aggregation", "params", "weighting"),
    [
        ("fedavg", {}, "samples"),
        ("fedavg", {}, "uniform"),
        ("fedprox", {"mu": 0.1}, "samples"),  # mu acts at the sites; aggregation is FedAvg's
    ],
)
def test_mean_strategies_give_the_pure_fedavg_bits(blobs, aggregation, params, weighting):
    base, updates = _base(), _updates(3)
    model = blobs.put(encode_tensors(base))
    strategy = make_strategy(aggregation, params, weighting=weighting)
    result = aggregate_round(blobs, model, _put(blobs, updates), strategy)
    assert result.opt_state is None
    expected = fedavg(updates, COUNTS[:3], weighting=weighting)
    assert result.model == _plus(base, expected)


def test_fedavg_by_hand(blobs):
    base = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    updates = [
        {"w": np.array([0.5, -1.0], dtype=np.float32)},
        {"w": np.array([-0.25, 1.0], dtype=np.float32)},
    ]
    records = [
        UpdateRecord("run", 1, "s0", blobs.put(encode_tensors(updates[0])), 1, 0.0, 0.0),
        UpdateRecord("run", 1, "s1", blobs.put(encode_tensors(updates[1])), 3, 0.0, 0.0),
    ]
    result = aggregate_round(
        blobs, blobs.put(encode_tensors(base)), records, make_strategy("fedavg")
    )
    # 1/4 * 0.5 + 3/4 * -0.25 = -0.0625; 1/4 * -1 + 3/4 * 1 = 0.5
    np.testing.assert_allclose(decode_tensors(result.model)["w"], [0.9375, 2.5], atol=1e-6)


def test_median_resists_a_huge_update_and_matches_the_pure_function(blobs):
    base, updates = _base(), _updates(3)
    updates[2] = {name: np.full_like(a, 15.0) for name, a in updates[2].items()}
    model = blobs.put(encode_tensors(base))
    result = aggregate_round(blobs, model, _put(blobs, updates), make_strategy("median"))
    assert result.opt_state is None
    assert result.model == _plus(base, coordinate_median(updates))
    new = decode_tensors(result.model)
    assert all(np.abs(new[n] - base[n]).max() < 1.0 for n in base)


def test_trimmed_mean_matches_the_pure_function_and_by_hand(blobs):
    base, updates = _base(), _updates(5)
    model = blobs.put(encode_tensors(base))
    strategy = make_strategy("trimmed_mean", {"trim_fraction": 0.2})
    result = aggregate_round(blobs, model, _put(blobs, updates), strategy)
    assert result.model == _plus(base, trimmed_mean(updates, 0.2))
    # by hand: drop the lowest and highest of five per coordinate, average the middle three
    stacked = np.sort(np.stack([u["b.bias"] for u in updates]), axis=0)
    np.testing.assert_allclose(
        decode_tensors(result.model)["b.bias"],
        base["b.bias"] + stacked[1:4].mean(axis=0),
        atol=1e-6,
    )


def test_robust_path_checks_the_update_blobs(blobs):
    base, updates = _base(), _updates(3)
    records = _put(blobs, updates)
    blobs.path(records[1].digest).write_bytes(encode_tensors(_updates(1, seed=9)[0]))
    with pytest.raises(StorageError, match="corrupted on disk") as info:
        aggregate_round(blobs, blobs.put(encode_tensors(base)), records, make_strategy("median"))
    assert info.value.code == "storage.blob"


def test_fedadam_takes_one_optimiser_step_per_round_from_the_stored_state(blobs):
    base = _base()
    strategy = make_strategy("fedadam", {"eta": 0.1, "tau": 1e-2}, weighting="samples")
    round1, round2 = _updates(3, seed=1), _updates(3, seed=2)

    r1 = aggregate_round(blobs, blobs.put(encode_tensors(base)), _put(blobs, round1), strategy)
    assert r1.opt_state is not None
    state_digest = blobs.put(r1.opt_state)
    model1 = blobs.put(r1.model)
    r2 = aggregate_round(blobs, model1, _put(blobs, round2, rnd=2), strategy, state_digest)
    assert r2.opt_state is not None

    # the same two steps with the pure functions
    w1, s1 = server_step(base, fedavg(round1, COUNTS[:3]), initial_state(base, strategy), strategy)
    w2, s2 = server_step(w1, fedavg(round2, COUNTS[:3]), s1, strategy)
    assert r1.model == encode_tensors(w1) and r1.opt_state == encode_tensors(s1.to_arrays())
    assert r2.model == encode_tensors(w2) and r2.opt_state == encode_tensors(s2.to_arrays())
    assert ServerOptState.from_arrays(decode_tensors(r2.opt_state)).step == 2
    assert r2.model != r1.model

    # deterministic: the same inputs (sites in another order) give the same bytes
    again = aggregate_round(
        blobs, model1, list(reversed(_put(blobs, round2, rnd=2))), strategy, state_digest
    )
    assert again.model == r2.model and again.opt_state == r2.opt_state


def test_state_is_refused_by_strategies_without_one(blobs):
    base = _base()
    model = blobs.put(encode_tensors(base))
    with pytest.raises(ValueError, match="fedavg keeps no server state"):
        aggregate_round(blobs, model, _put(blobs, _updates(2)), make_strategy("fedavg"), model)


def test_round_records_the_optimiser_state_across_a_restart(tmp_path):
    path = tmp_path / "state.db"
    first = Store(path)
    first.add_plan("planhash", "demo", "{}", "SIG", now=5.0)
    run = first.create_run("planhash", "00" * 32, now=10.0)
    first.open_round(run.run_id, 1, ["a"], "00" * 32, now=11.0, deadline=111.0)
    first.commit_round(run.run_id, 1, "11" * 32, 1, 0.5, final=False, now=20.0, opt_state="22" * 32)
    first.close()
    second = Store(path)
    try:
        assert second.round_row(run.run_id, 1)["opt_state"] == "22" * 32  # type: ignore[index]
        second.open_round(run.run_id, 2, ["a"], "11" * 32, now=21.0, deadline=121.0)
        assert second.round_row(run.run_id, 2)["opt_state"] is None  # type: ignore[index]
    finally:
        second.close()


def test_a_database_made_before_opt_state_gains_the_column(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE rounds (run_id TEXT, round INTEGER, attempt INTEGER, status TEXT, "
        "opened_at FLOAT, deadline_at FLOAT, selected TEXT, closed_at FLOAT, model_in TEXT, "
        "model_out TEXT, n_updates INTEGER, mean_loss FLOAT, PRIMARY KEY (run_id, round))"
    )
    conn.execute("INSERT INTO rounds VALUES ('r', 1, 1, 'closed', 1, 2, '[]', 3, 'a', 'b', 2, 0.5)")
    conn.commit()
    conn.close()
    store = Store(path)
    try:
        row = store.round_row("r", 1)
        assert row is not None and row["opt_state"] is None and row["model_out"] == "b"
    finally:
        store.close()
    Store(path).close()  # migrating again leaves it alone


def test_a_median_plan_with_quorum_2_is_refused_with_the_reason():
    with pytest.raises(PlanError, match=r"median of 2 update\(s\) is their mean.*quorum") as info:
        demo_plan(aggregation="median", quorum=2, min_sites=3)
    assert info.value.code == "plan.invalid"
    assert info.value.fields["field"] == "quorum"
    assert demo_plan(aggregation="median", quorum=3, min_sites=3).aggregation == "median"
