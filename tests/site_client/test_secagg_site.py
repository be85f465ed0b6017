"""A site's checks and protection in a securely aggregated round (``secagg_site``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from shared.crypto.keys import generate_signing_key, public_key_b64
from shared.crypto.signing import sign
from shared.errors import SecAggMessageRejected
from shared.plan import demo_plan
from shared.privacy.secagg_plan import SETUP_PURPOSE, quantiser_clip
from shared.protocol.messages import SecAggSetup
from site_client.core.secagg_site import SiteSecAgg

DP = {"clip_norm": 1.0, "noise_multiplier": 2.0, "delta": 1e-5}
PLAN = demo_plan(secure_aggregation=True, weighting="uniform", dp=DP)
SITES = ["s1", "s2", "s3"]
LENGTH = 20_000


def _setup(coordinator: Any, keys: dict[str, Any], **config: Any) -> SecAggSetup:
    body = {
        "run_id": "run",
        "round": 1,
        "config": {
            "run_id": "run:a",
            "round": 1,
            "sites": SITES,
            "threshold": 2,
            "vector_length": LENGTH,
            "bits": 32,
            "clip_norm": quantiser_clip(PLAN, LENGTH, 2),
            "max_sites": 3,
            **config,
        },
        "site_keys": {s: public_key_b64(k) for s, k in keys.items()},
    }
    unsigned = SecAggSetup(**body, signature="-")
    return SecAggSetup(**body, signature=sign(coordinator, SETUP_PURPOSE, unsigned.signed_fields()))


def _site(setup: SecAggSetup, key: Any, coordinator: Any, plan: Any = PLAN) -> SiteSecAgg:
    return SiteSecAgg(
        setup,
        plan.to_dict(),
        site_id="s1",
        signing_key=key,
        coordinator_key=public_key_b64(coordinator),
        rng=np.random.default_rng(3),
    )


def test_a_site_adds_its_share_of_the_noise_before_masking() -> None:
    coordinator, keys = generate_signing_key(), {s: generate_signing_key() for s in SITES}
    site = _site(_setup(coordinator, keys), keys["s1"], coordinator)
    update = {"w": np.zeros(LENGTH, dtype=np.float32)}
    protected = site.protect(update)
    # threshold 2: each site's share has standard deviation z C / sqrt(2)
    assert np.std(protected["w"]) == pytest.approx(2.0 / math.sqrt(2), rel=0.03)


def test_a_site_refuses_a_setup_for_another_plan_or_without_its_key() -> None:
    coordinator, keys = generate_signing_key(), {s: generate_signing_key() for s in SITES}
    with pytest.raises(SecAggMessageRejected, match="does not match the approved plan") as info:
        _site(_setup(coordinator, keys, bits=64), keys["s1"], coordinator)
    assert info.value.code == "privacy.secagg.unsafe_request"
    stranger = generate_signing_key()
    with pytest.raises(SecAggMessageRejected, match="this site's key"):
        _site(_setup(coordinator, keys), stranger, coordinator)
    plain = demo_plan()
    with pytest.raises(SecAggMessageRejected, match="approved plan"):
        _site(_setup(coordinator, keys), keys["s1"], coordinator, plain)
