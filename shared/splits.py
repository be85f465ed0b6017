"""Patient-level, stratified train/hold-out splits, shared by sites and the demo's baselines.

All images of a patient fall on one side (no leakage between training and validation).
Patients are stratified by their label (positive if any of their images is) and ranked by a
seeded SHA-256 of their key, so the split is deterministic and does not depend on order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from shared.errors import DataError


def split_patients(
    patient_labels: Mapping[str, float], holdout_fraction: float = 0.2, seed: int = 0
) -> frozenset[str]:
    """The patients held out: stratified by patient label, deterministic (module docstring)."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise DataError(
            f"The hold-out fraction must be in [0, 1); got {holdout_fraction}.", code="data.split"
        )

    def rank(patients: list[str]) -> list[str]:
        return sorted(patients, key=lambda p: hashlib.sha256(f"{seed}\x00{p}".encode()).digest())

    held: list[str] = []
    strata = [
        rank([p for p, y in patient_labels.items() if y > 0]),
        rank([p for p, y in patient_labels.items() if y <= 0]),
    ]
    for patients in strata:
        n = len(patients)
        n_hold = 0  # a class of one patient stays in training, which needs it more
        if holdout_fraction > 0 and n >= 2:
            n_hold = min(max(round(holdout_fraction * n), 1), n - 1)
        held.extend(patients[:n_hold])
    if not held and holdout_fraction > 0 and len(patient_labels) >= 2:
        # only possible with one patient per class: the hold-out still gets one patient, as
        # the unstratified split always gave it (validation with none would say nothing)
        held.append(rank(list(patient_labels))[0])
    return frozenset(held)
