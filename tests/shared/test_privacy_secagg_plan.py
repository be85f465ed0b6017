"""What a plan's secure aggregation means in numbers (``shared.privacy.secagg_plan``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.errors import SecureAggregationError
from shared.plan import demo_plan
from shared.privacy.client_dp import ClientDP
from shared.privacy.secagg_plan import (
    flatten,
    noise_share,
    quantiser_clip,
    unflatten,
    vector_length,
    worker_plan,
)

DP = {"clip_norm": 2.0, "noise_multiplier": 1.2, "delta": 1e-5}


def test_each_site_adds_a_share_so_any_unmaskable_sum_carries_the_full_noise() -> None:
    dp = ClientDP(**DP)
    share = noise_share(dp, threshold=3)
    assert share.clip_norm == dp.clip_norm and share.delta == dp.delta
    # three shares (the fewest sites that can be unmasked) sum to the full variance
    assert 3 * share.noise_std**2 == pytest.approx(dp.noise_std**2)


def test_the_quantiser_bound_covers_the_noise_and_is_the_clip_without_dp() -> None:
    private = demo_plan(secure_aggregation=True, weighting="uniform", dp=DP)
    bound = quantiser_clip(private, 10_000, 2)
    sigma = 1.2 * 2.0 / math.sqrt(2)
    assert bound == pytest.approx(2.0 + sigma * (100 + 10))
    noisy = np.random.default_rng(0).normal(0, sigma, 10_000)
    assert np.linalg.norm(noisy) + 2.0 < bound
    plain = demo_plan(secure_aggregation=True, weighting="uniform", max_update_norm=7.0)
    assert quantiser_clip(plain, 10_000, 2) == 7.0
    with pytest.raises(SecureAggregationError, match="no bound on the updates"):
        quantiser_clip(demo_plan(), 10, 2)


def test_the_worker_trains_the_plain_plan_and_keeps_example_level_dp() -> None:
    plan = demo_plan(secure_aggregation=True, weighting="uniform", dp=DP).to_dict()
    assert "dp" not in worker_plan(plan) and "secure_aggregation" not in worker_plan(plan)
    example = {**plan, "dp": {"level": "example", "noise_multiplier": 1.0}}
    assert worker_plan(example)["dp"] == example["dp"]


def test_flatten_orders_by_name_and_unflatten_inverts_it() -> None:
    update = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), dtype=np.float32)}
    layout = {"a": ((2, 2), "float32"), "b": ((3,), "float32")}
    flat = flatten(update, layout)
    assert flat.tolist() == [1, 1, 1, 1, 0, 1, 2] and vector_length(layout) == 7
    back = unflatten(flat, layout)
    assert all(np.array_equal(back[k], update[k]) for k in update)
    with pytest.raises(SecureAggregationError, match="not the round's"):
        flatten({"a": update["a"]}, layout)
    with pytest.raises(SecureAggregationError, match="has shape"):
        flatten({**update, "b": np.zeros(4, dtype=np.float32)}, layout)
