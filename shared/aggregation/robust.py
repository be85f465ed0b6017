"""Byzantine-robust aggregation: coordinate-wise median and coordinate-wise trimmed mean.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018. For every parameter separately, the sites' values are sorted;
the median takes the middle one (the mean of the two middle ones for an even count), the
beta-trimmed mean drops the ``k = floor(beta * n)`` largest and ``k`` smallest and averages the
rest. One site sending garbage moves neither further than the honest sites' range, as long as
fewer than half (median) or at most ``k`` (trimmed mean) sites are off.

**Weights are ignored.** Both estimators count sites, not examples: weighting by a site's
declared sample count would let a single site claiming many examples take over the result,
which is what these estimators exist to prevent.

Theory of operation. Each tensor is processed in blocks of :data:`BLOCK` elements: the sites'
slices are stacked as ``(block, n)``, ``-0.0`` is turned into ``+0.0`` (a sort treats them as
equal, so otherwise their order, and the sign of a zero result, would depend on arrival order),
the rows are sorted, and the kept columns are averaged in float64 in sorted order. The sorted
rows do not depend on the order of the updates, so the result is bit-identical for any order.
Memory: the inputs (held by the caller) plus ``O(n * BLOCK)``. The result has the updates'
dtype; float64 arithmetic followed by one rounding keeps it within the per-parameter min/max.

The coordinator only sees the sum under secure aggregation, so neither can run there; see
:func:`shared.aggregation.strategies.validate_strategy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from shared.aggregation._config import number
from shared.aggregation.validation import BLOCK, check_keys, check_tensor_meta, layout_of
from shared.errors import UpdateError

Update = Mapping[str, np.ndarray]


def trim_count(beta: float, n: int) -> int:
    """``k = floor(beta * n)``, the updates dropped from each end (``beta * n`` is rounded to
    9 decimals first, so that 0.29 of 100 trims 29, not 28, despite binary floats)."""
    return math.floor(round(beta * n, 9))


def check_trim_fraction(beta: float) -> float:
    """``beta`` as a float if ``0 < beta < 0.5``, else ``PlanError(plan.invalid)``."""
    return number("trim_fraction", beta, low=0.0, high=0.5, low_open=True, high_open=True)


def coordinate_median(updates: Sequence[Update]) -> dict[str, np.ndarray]:
    """Coordinate-wise median of ``updates`` (Yin et al. 2018). Weights are not used.

    All updates must have the same names, shapes and float dtype, and finite values; raises
    ``UpdateError`` (``update.empty``, ``update.keys``, ``update.shape``, ``update.dtype``,
    ``update.nonfinite``) otherwise.
    """
    n = len(updates)

    def reduce(s: np.ndarray) -> np.ndarray:
        if n % 2:
            return s[:, n // 2].astype(np.float64)
        return (s[:, n // 2 - 1].astype(np.float64) + s[:, n // 2]) / 2

    return _coordinatewise(updates, reduce)


def trimmed_mean(updates: Sequence[Update], beta: float) -> dict[str, np.ndarray]:
    """Coordinate-wise ``beta``-trimmed mean (Yin et al. 2018). Weights are not used.

    ``0 < beta < 0.5`` (``PlanError`` otherwise); ``k = floor(beta * n)`` values are dropped
    from each end, so ``n - 2k >= 1`` always holds. With ``k == 0`` (too few updates for this
    ``beta``) nothing is trimmed and the result is the plain mean; the plan check
    (``validate_strategy(..., min_updates=quorum)``) refuses that in advance.
    Input errors as for :func:`coordinate_median`.
    """
    beta = check_trim_fraction(beta)
    n = len(updates)
    k = trim_count(beta, n)
    if n and not n > 2 * k:  # unreachable for beta < 0.5; kept as the estimator's invariant
        raise UpdateError(
            f"A {beta:g}-trimmed mean of {n} updates would drop all of them. Lower the trim "
            "fraction or wait for more updates.",
            code="update.count",
        )

    def reduce(s: np.ndarray) -> np.ndarray:
        kept = s[:, k : n - k].astype(np.float64)
        return np.sum(kept, axis=1) / (n - 2 * k)

    return _coordinatewise(updates, reduce)


def check_same_layout(updates: Sequence[Update]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The common layout of ``updates``, names sorted (so a result's order of names does not
    depend on which update came first either); ``UpdateError`` if empty or they differ."""
    if not updates:
        raise UpdateError(
            "No update to aggregate. Wait for at least one valid update (the round's quorum) "
            "before aggregating.",
            code="update.empty",
        )
    layout = dict(sorted(layout_of(updates[0]).items()))
    for name, (_shape, dtype) in layout.items():
        if np.dtype(dtype).kind != "f":
            raise UpdateError(
                f"Tensor {name!r} has dtype {dtype}; updates must be floating point. Leave "
                "integer buffers (e.g. num_batches_tracked) out of the update.",
                code="update.dtype",
                tensor=name,
            )
    for update in updates[1:]:
        check_keys(update.keys(), layout)
        for name in layout:
            a = np.asarray(update[name])
            check_tensor_meta(name, a.shape, str(a.dtype), layout)
    return layout


def _coordinatewise(
    updates: Sequence[Update], reduce: Callable[[np.ndarray], np.ndarray]
) -> dict[str, np.ndarray]:
    layout = check_same_layout(updates)
    out: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in layout.items():
        flats = [np.ascontiguousarray(u[name]).reshape(-1) for u in updates]
        size = flats[0].size
        result = np.empty(size, dtype=dtype)
        for i in range(0, size, BLOCK):
            stack = np.stack([f[i : i + BLOCK] for f in flats], axis=1)  # (block, n), a copy
            if not np.isfinite(stack).all():
                raise UpdateError(
                    f"Tensor {name!r} of an update holds NaN or infinite values. Reject that "
                    "update (validate updates on receipt) before aggregating.",
                    code="update.nonfinite",
                    tensor=name,
                )
            stack += 0.0  # -0.0 -> +0.0, so that sorting is order-independent bit for bit
            stack.sort(axis=1)
            result[i : i + BLOCK] = reduce(stack)
        out[name] = result.reshape(shape)
    return out
