"""Synthetic chest-radiograph federations for demos, tests and benchmarks (no real patients).

``generate_federation(out_dir, sites=3, seed=0)`` writes per-site DICOM folders with label
CSVs, a pooled held-out test set and ``manifest.json``; see :mod:`.federation`.
``setting="hard"`` gives four sites with strong scanner shift and label skew instead.
"""

from shared.synthetic.federation import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_IMAGES_PER_SITE,
    DEFAULT_TEST_IMAGES,
    HARD_IMAGES_PER_SITE,
    HARD_TEST_IMAGES,
    FederationManifest,
    SiteData,
    generate_federation,
)
from shared.synthetic.scanners import HARD_PROFILES, SETTINGS, ScannerProfile, profile_for_site

__all__ = [
    "DEFAULT_IMAGES_PER_SITE",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_TEST_IMAGES",
    "HARD_IMAGES_PER_SITE",
    "HARD_PROFILES",
    "HARD_TEST_IMAGES",
    "SETTINGS",
    "FederationManifest",
    "ScannerProfile",
    "SiteData",
    "generate_federation",
    "profile_for_site",
]
