"""Binary metrics against hand-computed values and a brute-force AUC."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.canonical import canonical_json
from shared.metrics import Metrics, binary_metrics, roc_auc


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Definition of AUC: P(positive > negative) + 0.5 P(tie), over all pairs."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # 3 of 4 pairs ordered
        ([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1], 0.875),  # one tied pair counts 1/2: 3.5 / 4
        ([0.3, 0.3, 0.3], [0, 1, 1], 0.5),  # all tied
        ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),
        ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.0),
        ([2.0, 2.0, 1.0, 3.0, 1.0], [1, 0, 1, 0, 0], 1 / 3),  # 2 of 6 pairs: 1 + 0.5 + 0.5
    ],
)
def test_roc_auc_hand_computed(scores: list[float], labels: list[int], expected: float) -> None:
    assert roc_auc(scores, labels) == pytest.approx(expected)


def test_roc_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        scores = rng.integers(0, 5, n) / 4.0  # many ties
        labels = rng.integers(0, 2, n)
        if labels.min() == labels.max():
            continue
        assert roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels))


def test_roc_auc_is_nan_with_one_class() -> None:
    assert math.isnan(roc_auc([0.1, 0.9], [1, 1]))
    assert math.isnan(roc_auc([0.1, 0.9], [0, 0]))
    assert math.isnan(roc_auc([], []))


def test_binary_metrics_hand_computed() -> None:
    # predicted positive at >= 0.5: [1, 0, 1, 0, 1]; TP=2, FN=1 (0.4), TN=1, FP=1 (0.6)
    probabilities = [0.9, 0.2, 0.6, 0.4, 0.7]
    labels = [1, 0, 0, 1, 1]
    m = binary_metrics(probabilities, labels)
    assert m.n == 5
    assert m.accuracy == pytest.approx(3 / 5)
    assert m.sensitivity == pytest.approx(2 / 3)
    assert m.specificity == pytest.approx(1 / 2)
    expected_loss = -np.mean(np.log([0.9, 0.8, 0.4, 0.4, 0.7]))
    assert m.loss == pytest.approx(expected_loss)
    assert m.auc == pytest.approx(roc_auc(probabilities, labels))


def test_threshold_is_inclusive_and_configurable() -> None:
    assert binary_metrics([0.5], [1]).sensitivity == 1.0
    m = binary_metrics([0.3, 0.6], [0, 1], threshold=0.7)
    assert (m.sensitivity, m.specificity) == (0.0, 1.0)


def test_loss_is_finite_for_certain_wrong_predictions() -> None:
    assert math.isfinite(binary_metrics([0.0, 1.0], [1, 0]).loss)


def test_undefined_metrics_are_nan_and_none_in_dict() -> None:
    m = binary_metrics([0.2, 0.7], [1, 1])
    assert math.isnan(m.auc) and math.isnan(m.specificity)
    data = m.to_dict()
    assert data["auc"] is None and data["specificity"] is None
    assert data["sensitivity"] == 0.5 and data["n"] == 2
    canonical_json(data)  # no NaN reaches the wire


def test_metrics_is_frozen() -> None:
    m = Metrics(auc=1.0, accuracy=1.0, sensitivity=1.0, specificity=1.0, loss=0.0, n=1)
    with pytest.raises(AttributeError, match="cannot assign to field 'auc'"):
        m.auc = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, 0.2], [1], "1-D of equal length"),
        ([0.1], [2], "labels must be 0 or 1"),
        ([float("nan")], [1], "scores must be finite"),
        ([1.5], [1], r"probabilities must lie in \[0, 1\]"),
    ],
)
def test_invalid_inputs(scores: list[float], labels: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        binary_metrics(scores, labels)
