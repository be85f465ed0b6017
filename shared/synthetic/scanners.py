"""Per-site scanner looks: how one hospital's detector turns a density map into stored pixels.

Theory of operation: a site's images differ from another's in ways that a per-image z-score
does not undo — the transfer curve (gamma), sharpness (blur), noise level, and how strong the
lesions it sees are relative to that noise — and in ways it does (offset, gain, bit depth,
RescaleSlope/Intercept, MONOCHROME1 storage). Both kinds are here on purpose: the first makes a
model trained at one site generalise poorly to the others (the reason to federate), the second
exercises the reader (:mod:`shared.imaging`).

Three base profiles are used in turn; sites beyond the third reuse them with a deterministic
variation (:func:`profile_for_site`).

The ``"hard"`` setting (:data:`HARD_PROFILES`, for the heterogeneity benchmarks) has four
scanners whose looks differ much more in the first kind of way: a compressive and an expansive
transfer curve, a soft and noisy computed-radiography plate next to a sharp flat panel, and
label skew across the sites (positive rates 0.15 / 0.35 / 0.60 / 0.80). That is the feature
shift plus label shift for which FedBN (Li et al., ICLR 2021) and FedProx (Li et al., MLSys
2020) were designed, and which hurts plain FedAvg and sites training alone. Its nodules are a
little more conspicuous than the default's (contrast 0.16-0.30), so that a model trained on
all four sites reaches an AUC near 0.97 and the comparison of strategies is not lost in the
noise of a barely learnable task.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from shared.errors import DataError
from shared.synthetic.phantom import gaussian_blur

# SOP classes (PS3.4 B.5): Digital X-Ray Image Storage - For Presentation, Computed Radiography.
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
COMPUTED_RADIOGRAPHY = "1.2.840.10008.5.1.4.1.1.1"


@dataclass(frozen=True, slots=True, kw_only=True)
class ScannerProfile:
    manufacturer: str
    model: str
    modality: str  # "DX" or "CR"
    sop_class_uid: str
    bits_stored: int
    pixel_spacing_mm: float
    photometric: str  # "MONOCHROME1" or "MONOCHROME2"
    rescale_slope: float
    rescale_intercept: float
    gamma: float
    contrast: float  # fraction of the stored range used by density 0..1
    offset: float  # fraction of the stored range at density 0
    noise: float  # Gaussian noise std, in units of the (pre-gain) density
    blur_sigma: float  # in pixels at 128 x 128; scaled with the matrix size
    prevalence: float
    lesion_radius: tuple[float, float]  # normalised units (see phantom.Lesion)
    lesion_contrast: tuple[float, float]  # density units


BASE_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile(
        manufacturer="Synthetica Medical",
        model="LumaDR 500",
        modality="DX",
        sop_class_uid=DX_FOR_PRESENTATION,
        bits_stored=12,
        pixel_spacing_mm=0.30,
        photometric="MONOCHROME2",
        rescale_slope=1.0,
        rescale_intercept=0.0,
        gamma=1.0,
        contrast=0.85,
        offset=0.05,
        noise=0.03,
        blur_sigma=0.5,
        prevalence=0.25,
        lesion_radius=(0.05, 0.09),
        lesion_contrast=(0.12, 0.26),
    ),
    ScannerProfile(
        manufacturer="Northwind Imaging",
        model="CR-Vista 10",
        modality="CR",
        sop_class_uid=COMPUTED_RADIOGRAPHY,
        bits_stored=10,
        pixel_spacing_mm=0.20,
        photometric="MONOCHROME1",
        rescale_slope=1.0,
        rescale_intercept=0.0,
        gamma=0.9,
        contrast=0.90,
        offset=0.02,
        noise=0.033,
        blur_sigma=0.7,
        prevalence=0.50,
        lesion_radius=(0.06, 0.11),
        lesion_contrast=(0.14, 0.28),
    ),
    ScannerProfile(
        manufacturer="Helix Radiography",
        model="HX-16 Flat Panel",
        modality="DX",
        sop_class_uid=DX_FOR_PRESENTATION,
        bits_stored=16,
        pixel_spacing_mm=0.143,
        photometric="MONOCHROME2",
        rescale_slope=2.0,
        rescale_intercept=-1024.0,
        gamma=1.15,
        contrast=0.70,
        offset=0.15,
        noise=0.027,
        blur_sigma=0.4,
        prevalence=0.65,
        lesion_radius=(0.045, 0.08),
        lesion_contrast=(0.12, 0.24),
    ),
)


#: The ``"hard"`` setting: four different scanner models, strong shift, label skew.
HARD_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile(
        manufacturer="Synthetica Medical",
        model="LumaDR 900 HS",
        modality="DX",
        sop_class_uid=DX_FOR_PRESENTATION,
        bits_stored=12,
        pixel_spacing_mm=0.30,
        photometric="MONOCHROME2",
        rescale_slope=1.0,
        rescale_intercept=0.0,
        gamma=0.55,  # compressive: dense regions flattened, lungs lifted
        contrast=0.80,
        offset=0.10,
        noise=0.02,
        blur_sigma=0.3,
        prevalence=0.15,
        lesion_radius=(0.05, 0.09),
        lesion_contrast=(0.16, 0.30),
    ),
    ScannerProfile(
        manufacturer="Northwind Imaging",
        model="CR-Vista 2 (legacy plate)",
        modality="CR",
        sop_class_uid=COMPUTED_RADIOGRAPHY,
        bits_stored=10,
        pixel_spacing_mm=0.20,
        photometric="MONOCHROME1",
        rescale_slope=1.0,
        rescale_intercept=0.0,
        gamma=1.0,
        contrast=0.90,
        offset=0.02,
        noise=0.06,  # an old, noisy and soft plate
        blur_sigma=1.6,
        prevalence=0.35,
        lesion_radius=(0.05, 0.09),
        lesion_contrast=(0.16, 0.30),
    ),
    ScannerProfile(
        manufacturer="Helix Radiography",
        model="HX-16 Flat Panel",
        modality="DX",
        sop_class_uid=DX_FOR_PRESENTATION,
        bits_stored=16,
        pixel_spacing_mm=0.143,
        photometric="MONOCHROME2",
        rescale_slope=2.0,
        rescale_intercept=-1024.0,
        gamma=1.8,  # expansive: lungs crushed towards black, bone bright
        contrast=0.70,
        offset=0.15,
        noise=0.025,
        blur_sigma=0.4,
        prevalence=0.60,
        lesion_radius=(0.05, 0.09),
        lesion_contrast=(0.16, 0.30),
    ),
    ScannerProfile(
        manufacturer="Meridian Diagnostics",
        model="Apex DR-S",
        modality="DX",
        sop_class_uid=DX_FOR_PRESENTATION,
        bits_stored=14,
        pixel_spacing_mm=0.175,
        photometric="MONOCHROME2",
        rescale_slope=1.0,
        rescale_intercept=0.0,
        gamma=1.3,
        contrast=0.85,
        offset=0.05,
        noise=0.045,
        blur_sigma=0.9,
        prevalence=0.80,
        lesion_radius=(0.05, 0.09),
        lesion_contrast=(0.16, 0.30),
    ),
)

SETTINGS = ("default", "hard")


def profile_for_site(index: int, setting: str = "default") -> ScannerProfile:
    """The profile of site ``index`` (0-based) in ``setting``.

    ``"default"``: the base profiles in turn, varied past the third. The variation is a
    deterministic function of the index (no RNG), so adding sites never changes the looks of
    the existing ones. ``"hard"``: :data:`HARD_PROFILES`, one per site (at most four sites).
    """
    if setting == "hard":
        if not 0 <= index < len(HARD_PROFILES):
            raise DataError(
                f"The hard setting has {len(HARD_PROFILES)} scanners; site index {index} is "
                f"outside 0..{len(HARD_PROFILES) - 1}. Ask for at most "
                f"{len(HARD_PROFILES)} sites.",
                code="data.synthetic",
            )
        return HARD_PROFILES[index]
    if setting != "default":
        raise DataError(
            f"Unknown synthetic setting {setting!r}; choose one of "
            f"{', '.join(map(repr, SETTINGS))}.",
            code="data.synthetic",
        )
    base = BASE_PROFILES[index % len(BASE_PROFILES)]
    cycle = index // len(BASE_PROFILES)
    if cycle == 0:
        return base
    wobble = ((cycle * 7919) % 11 - 5) / 10.0  # in [-0.5, 0.5]
    return replace(
        base,
        model=f"{base.model} Mk{cycle + 1}",
        gamma=float(np.clip(base.gamma * (1.0 + 0.3 * wobble), 0.4, 2.5)),
        noise=float(base.noise * (1.0 + 0.4 * wobble)),
        blur_sigma=float(max(0.0, base.blur_sigma + 0.5 * wobble)),
        prevalence=float(np.clip(base.prevalence + 0.15 * wobble, 0.1, 0.9)),
        pixel_spacing_mm=round(base.pixel_spacing_mm * (1.0 + 0.2 * wobble), 3),
    )


def acquire(density: np.ndarray, profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """Stored pixel values (uint16) of one image as this scanner would write them.

    Order: detector blur, transfer curve (gamma), noise, gain/offset, quantisation to
    ``bits_stored``, then MONOCHROME1 inversion (PS3.3 C.7.6.3.1.2). RescaleSlope/Intercept
    (PS3.3 C.11.1) only go in the header: a positive slope keeps the order of intensities.
    """
    size = density.shape[0]
    img = gaussian_blur(density, profile.blur_sigma * size / 128.0)
    img = np.clip(img, 0.0, 1.0) ** profile.gamma
    img = img + profile.noise * rng.standard_normal(img.shape)
    top = float(2**profile.bits_stored - 1)
    # Stored values use the whole [0, top] range; the site's Modality LUT (value = stored *
    # slope + intercept) is written in the header and undone by the reader.
    stored = (profile.offset + profile.contrast * img) * top
    stored = np.clip(np.rint(stored), 0.0, top)
    if profile.photometric == "MONOCHROME1":
        stored = top - stored
    return stored.astype(np.uint16)
