"""Binary classification metrics in plain numpy, so every site reports the same numbers.

Sites send only these aggregates, never per-image results (DESIGN.md "Validation protocol").
Undefined values (AUC with one class present, sensitivity without positives) are NaN, and
``Metrics.to_dict`` writes them as ``None`` so the result is valid canonical JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

_EPS = 1e-12  # probability clip for the log loss


def _validate(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"scores and labels must be 1-D of equal length; got {s.shape}, {y.shape}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s, y.astype(bool)


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (Hanley & McNeil, Radiology
    1982): the probability that a random positive scores above a random negative, ties
    counting one half (average ranks). NaN when only one class is present."""
    s, y = _validate(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="stable")
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based average ranks
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclass(frozen=True, slots=True, kw_only=True)
class Metrics:
    """Validation metrics of one model on one dataset; NaN where undefined."""

    auc: float
    accuracy: float
    sensitivity: float
    specificity: float
    loss: float
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready dict; NaN becomes None (canonical JSON has no NaN)."""
        return {
            k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in asdict(self).items()
        }


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def binary_metrics(
    probabilities: ArrayLike,
    labels: ArrayLike,
    threshold: float = 0.5,
    *,
    ranking: ArrayLike | None = None,
) -> Metrics:
    """AUC, accuracy, sensitivity (TP rate), specificity (TN rate) at ``threshold`` (a
    probability at or above it is called positive) and mean binary cross-entropy.
    ``probabilities`` must lie in [0, 1]; they are clipped to [1e-12, 1 - 1e-12] for the loss.
    ``ranking`` (e.g. the logits) orders the images for the AUC instead of the probabilities,
    which saturate to 1.0 for confident outputs and would tie them."""
    p, y = _validate(probabilities, labels)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("probabilities must lie in [0, 1]")
    n = int(p.size)
    predicted = p >= threshold
    tp = int(np.sum(predicted & y))
    tn = int(np.sum(~predicted & ~y))
    positives = int(y.sum())
    clipped = np.clip(p, _EPS, 1 - _EPS)
    loss = float(-np.mean(np.where(y, np.log(clipped), np.log1p(-clipped)))) if n else math.nan
    return Metrics(
        auc=roc_auc(p if ranking is None else _validate(ranking, labels)[0], y),
        accuracy=_ratio(tp + tn, n),
        sensitivity=_ratio(tp, positives),
        specificity=_ratio(tn, n - positives),
        loss=loss,
        n=n,
    )
