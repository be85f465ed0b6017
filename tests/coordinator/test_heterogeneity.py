"""Scanner-shift warning from shared data summaries: hand-computed distances."""

from __future__ import annotations

import pytest

from coordinator.heterogeneity import (
    FEATURES,
    scanner_shift,
    shift_entry,
    shift_warning,
    total_variation,
)


def _summary(scanner: dict[str, int], spacing: dict[str, int] | None = None) -> dict:
    same = {"x": sum(scanner.values())}
    return {
        "by_scanner": scanner,
        "by_pixel_spacing": spacing or same,
        "by_bits_stored": same,
        "by_photometric": same,
        "by_image_size": same,
    }


def test_total_variation_by_hand() -> None:
    assert total_variation({"A": 10}, {"A": 3}) == 0.0  # same mix, other sizes
    assert total_variation({"A": 1}, {"B": 1}) == 1.0  # nothing in common
    # (0.75, 0.25) vs (0.25, 0.75): half of |0.5| + |0.5| = 0.5
    assert total_variation({"A": 3, "B": 1}, {"A": 1, "B": 3}) == pytest.approx(0.5)
    assert total_variation({}, {}) == 0.0
    assert total_variation({}, {"A": 1}) == 1.0


def test_levels_and_the_most_different_pair() -> None:
    alike = scanner_shift({"s1": _summary({"A": 5}), "s2": _summary({"A": 9})})
    assert alike.level == "low" and alike.distance == 0.0
    # disjoint scanners and spacings: 2 of the 5 features differ fully -> 2/5 = 0.4
    moderate = scanner_shift(
        {"s1": _summary({"A": 5}, {"0.2": 5}), "s2": _summary({"B": 5}, {"0.3": 5})}
    )
    assert moderate.level == "moderate" and moderate.distance == pytest.approx(2 / len(FEATURES))
    strong_summary = {f: {"other": 4} for f in FEATURES}
    strong = scanner_shift(
        {"s1": _summary({"A": 4}), "s2": _summary({"A": 4}), "s3": strong_summary}
    )
    assert strong.level == "strong" and strong.distance == 1.0
    assert strong.pair == ("s1", "s3")
    assert "FedBN" in strong.message
    assert scanner_shift({"s1": _summary({"A": 1})}).level == "unknown"


def test_the_warning_suggests_fedbn_only_for_strong_shift_under_another_strategy() -> None:
    strong = {"s1": _summary({"A": 4}), "s2": {f: {"other": 4} for f in FEATURES}}
    entry = shift_entry(strong, "fedavg")
    assert entry is not None and entry["level"] == "strong" and entry["sites"] == 2
    assert entry["pair"] == ["s1", "s2"] and "FedBN" in entry["warning"]
    assert "'fedavg'" in entry["warning"]
    assert shift_entry(strong, "fedbn")["warning"] is None  # the plan already keeps BN local
    alike = {"s1": _summary({"A": 5}), "s2": _summary({"A": 9})}
    assert shift_entry(alike, "fedavg")["warning"] is None
    assert shift_warning(scanner_shift(alike), "fedavg") is None
    assert shift_entry({"s1": _summary({"A": 1})}, "fedavg") is None  # nothing to compare
