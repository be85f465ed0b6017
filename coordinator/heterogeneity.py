"""Scanner shift between sites, from the data summaries they chose to share (counts only).

Hospitals image with different scanners and protocols (feature shift), which slows
federated training and hurts the worst site; FedBN (Li et al., ICLR 2021) was designed for it.
The coordinator compares the sites' "scanner fingerprints" — distributions over scanner
model, pixel spacing, bits stored, photometric interpretation and image size — by total
variation distance (half the L1 distance between the normalised counts), averages over those
features for each pair of sites, and reports the most different pair. Pure.

The server records the assessment in the provenance log (``scanner_shift_assessed``, from
:func:`shift_entry`) whenever it changes during a run, and logs :func:`shift_warning` for the
operator; the run's HTML report shows the last assessment (``coordinator/report.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations
from typing import Any

FEATURES = ("by_scanner", "by_pixel_spacing", "by_bits_stored", "by_photometric", "by_image_size")
MODERATE = 0.2
STRONG = 0.5


def total_variation(a: Mapping[str, int], b: Mapping[str, int]) -> float:
    """TV distance of two count tables: 0 for the same mix, 1 for nothing in common."""
    na, nb = sum(a.values()), sum(b.values())
    if na == 0 or nb == 0:
        return 0.0 if na == nb else 1.0
    keys = set(a) | set(b)
    return 0.5 * sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in keys)


@dataclass(frozen=True, slots=True)
class ShiftReport:
    level: str  # "unknown" (fewer than two summaries), "low", "moderate", "strong"
    distance: float  # the largest pairwise mean TV distance
    pair: tuple[str, str] | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "distance": round(self.distance, 4),
            "pair": list(self.pair) if self.pair else None,
            "message": self.message,
        }


def pair_distance(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    return sum(total_variation(a.get(f, {}), b.get(f, {})) for f in FEATURES) / len(FEATURES)


def scanner_shift(summaries: Mapping[str, Mapping[str, Any]]) -> ShiftReport:
    if len(summaries) < 2:
        return ShiftReport(
            "unknown", 0.0, None, "Fewer than two sites shared a data summary: no comparison."
        )
    distance, pair = max(  # the first of equally distant pairs, in sorted order
        (
            (pair_distance(summaries[x], summaries[y]), (x, y))
            for x, y in combinations(sorted(summaries), 2)
        ),
        key=lambda item: item[0],
    )
    if distance >= STRONG:
        level = "strong"
        message = (
            f"The sites' scanners differ strongly ({pair[0]} vs {pair[1]}: {distance:.2f}). "
            "Expect slower training and a weaker worst site; consider FedBN, which keeps "
            "normalisation layers local to each site (Li et al. 2021)."
        )
    elif distance >= MODERATE:
        level = "moderate"
        message = (
            f"The sites' scanners differ ({pair[0]} vs {pair[1]}: {distance:.2f}); watch the "
            "worst site's validation."
        )
    else:
        level, message = (
            "low",
            f"The sites' scanners are alike (largest difference {distance:.2f}).",
        )
    return ShiftReport(level, distance, pair, message)


def shift_warning(report: ShiftReport, aggregation: str) -> str | None:
    """The operator's warning for a run aggregated with ``aggregation``: when the scanners
    differ strongly and the plan does not already keep normalisation layers local (FedBN)."""
    if report.level != "strong" or aggregation == "fedbn":
        return None
    return f"{report.message} This run aggregates with {aggregation!r}."


def shift_entry(
    summaries: Mapping[str, Mapping[str, Any]], aggregation: str
) -> dict[str, Any] | None:
    """The provenance-log payload of an assessment of ``summaries`` (counts only; site ids,
    no data), or ``None`` while fewer than two sites shared a summary."""
    report = scanner_shift(summaries)
    if report.level == "unknown":
        return None
    return {
        **report.to_dict(),
        "sites": len(summaries),
        "aggregation": aggregation,
        "warning": shift_warning(report, aggregation),
    }
