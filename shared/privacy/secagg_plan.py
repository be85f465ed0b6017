"""What a plan's secure aggregation means in numbers, for both sides of the wire.

The coordinator announces each round's configuration (``SecAggSetup``); each site recomputes
the parts that follow from the plan and refuses a setup that differs, so a coordinator cannot
widen the quantiser or thin the noise unseen.

Client-level DP under secure aggregation (McMahan et al., ICLR 2018; Bonawitz et al., CCS
2017): the coordinator only sees the sum, so each site adds a *share* of the Gaussian noise,
standard deviation ``z C / sqrt(t)`` with ``t`` the round's threshold (the fewest sites whose
sum can be unmasked): any unmaskable sum carries at least the full noise ``z C``. A site's
noisy update is longer than ``C``; the quantiser's bound is widened by a tail bound on the
noise's norm (a chi variable with ``d`` degrees of freedom exceeds ``sqrt(d) + 10`` with
probability below ``exp(-50)``), so that quantising never clips the noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.errors import SecureAggregationError
from shared.privacy.client_dp import ClientDP

__all__ = [
    "SETUP_PURPOSE",
    "flatten",
    "noise_share",
    "quantiser_clip",
    "unflatten",
    "worker_plan",
]

SETUP_PURPOSE = "secagg.setup"
BITS = 32
_TAIL = 10.0

Layout = Mapping[str, tuple[tuple[int, ...], str]]


def noise_share(dp: ClientDP, threshold: int) -> ClientDP:
    """The DP settings one site applies: its clip, and its share of the noise."""
    return ClientDP(
        clip_norm=dp.clip_norm,
        noise_multiplier=dp.noise_multiplier / math.sqrt(threshold),
        delta=dp.delta,
    )


def quantiser_clip(plan: Any, vector_length: int, threshold: int) -> float:
    """The L2 bound of the quantiser for ``plan`` (a ``TrainingPlan``)."""
    clip = plan.secagg_clip_norm
    if clip is None:
        raise SecureAggregationError(
            "This plan has no bound on the updates; secure aggregation cannot quantise them.",
            code="privacy.bad_parameter",
        )
    if isinstance(plan.dp, ClientDP):
        share = noise_share(plan.dp, threshold)
        return float(clip + share.noise_std * (math.sqrt(vector_length) + _TAIL))
    return float(clip)


def worker_plan(plan: Mapping[str, Any]) -> dict[str, Any]:
    """The plan a site's training worker gets under secure aggregation: without client-level
    DP (the site adds its share of the noise itself, before masking) and without secure
    aggregation (the worker trains as usual)."""
    out = {k: v for k, v in plan.items() if k != "secure_aggregation"}
    dp = out.get("dp")
    if isinstance(dp, Mapping) and "level" not in dp:
        out.pop("dp")
    return out


def flatten(update: Mapping[str, np.ndarray], layout: Layout) -> np.ndarray:
    """One float64 vector of ``update``'s entries in ``layout``'s sorted order (the order
    both sides use)."""
    if set(update) != set(layout):
        raise SecureAggregationError(
            "The update's entries are not the round's; it cannot be masked.",
            code="update.shape",
        )
    parts = []
    for name in sorted(layout):
        shape = tuple(layout[name][0])
        array = np.asarray(update[name])
        if tuple(array.shape) != shape:
            raise SecureAggregationError(
                f"Update entry {name!r} has shape {array.shape}, not {shape}.",
                code="update.shape",
            )
        parts.append(array.reshape(-1).astype(np.float64))
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(vector: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten`, as float32 (an update's dtype)."""
    out: dict[str, np.ndarray] = {}
    at = 0
    for name in sorted(layout):
        shape = tuple(layout[name][0])
        size = math.prod(shape)
        out[name] = vector[at : at + size].reshape(shape).astype(np.float32)
        at += size
    return out


def vector_length(layout: Layout) -> int:
    return sum(math.prod(tuple(shape)) for shape, _ in layout.values())
