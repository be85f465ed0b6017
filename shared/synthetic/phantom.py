"""Chest-radiograph-like phantoms: a density map of a thorax, with or without a nodule.

Theory of operation: the phantom is a *density* map in [0, 1] (bright = dense, as in a
MONOCHROME2 chest film): air outside the body, soft tissue, two dark lung fields, a bright
mediastinum and spine, rib arcs crossing the lungs, and low-frequency "vessel" texture. A
lesion is a soft-edged round blob (a solitary pulmonary nodule) placed inside one lung field,
with its own size and contrast. Everything is drawn in normalised coordinates so the same
patient looks the same at any matrix size. The scanner look (gamma, blur, noise, bit depth,
photometric interpretation) is applied afterwards, in :mod:`shared.synthetic.scanners`.

All randomness comes from the ``numpy.random.Generator`` passed in: same generator state,
same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True, kw_only=True)
class Anatomy:
    """One patient's thorax geometry (normalised coordinates, x to the right, y downwards)."""

    scale: float
    lung_dx: float
    lung_cy: float
    lung_rx: float
    lung_ry: float
    heart_shift: float
    rib_phase: float
    texture_seed: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Lesion:
    """A nodule: centre (normalised coordinates), radius (fraction of the width), contrast."""

    cx: float
    cy: float
    radius: float
    contrast: float


def random_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        scale=float(rng.uniform(0.92, 1.05)),
        lung_dx=float(rng.uniform(0.34, 0.41)),
        lung_cy=float(rng.uniform(-0.10, 0.0)),
        lung_rx=float(rng.uniform(0.24, 0.29)),
        lung_ry=float(rng.uniform(0.55, 0.66)),
        heart_shift=float(rng.uniform(-0.04, 0.06)),
        rib_phase=float(rng.uniform(0.0, 1.0)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(coords, coords, indexing="ij")
    return x, y


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float):
    """Soft-edged ellipse mask in [0, 1]."""
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1.0 - r) * 12.0, 0.0, 1.0)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflected edges (numpy only, deterministic)."""
    if sigma <= 0:
        return image
    radius = max(1, int(np.ceil(3.0 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    out = image
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for k, w in enumerate(kernel):
            acc += w * (padded[k : k + n, :] if axis == 0 else padded[:, k : k + n])
        out = acc
    return out


def lung_masks(anatomy: Anatomy, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft masks of the right and left lung fields."""
    x, y = _grid(size)
    s = anatomy.scale
    right = _ellipse(
        x, y, -anatomy.lung_dx * s, anatomy.lung_cy, anatomy.lung_rx * s, anatomy.lung_ry * s
    )
    left = _ellipse(
        x,
        y,
        anatomy.lung_dx * s,
        anatomy.lung_cy + 0.03,
        anatomy.lung_rx * s * 0.95,
        anatomy.lung_ry * s * 0.97,
    )
    return right, left


def random_lesion(
    rng: np.random.Generator,
    anatomy: Anatomy,
    *,
    radius_range: tuple[float, float],
    contrast_range: tuple[float, float],
) -> Lesion:
    """A nodule centred well inside one lung field (rejection sampling on the ellipse)."""
    s = anatomy.scale
    side = -1.0 if rng.random() < 0.5 else 1.0
    cx0 = side * anatomy.lung_dx * s
    cy0 = anatomy.lung_cy + (0.03 if side > 0 else 0.0)
    rx, ry = anatomy.lung_rx * s * 0.95, anatomy.lung_ry * s * 0.97
    radius = float(rng.uniform(*radius_range))
    for _ in range(100):
        u, v = rng.uniform(-1.0, 1.0, size=2)
        if u * u + v * v <= 0.55:  # stay away from the lung border
            break
    return Lesion(
        cx=float(cx0 + u * rx),
        cy=float(cy0 + v * ry),
        radius=radius,
        contrast=float(rng.uniform(*contrast_range)),
    )


def render_density(anatomy: Anatomy, lesion: Lesion | None, size: int) -> np.ndarray:
    """The density map (float64, [0, 1], bright = dense) of one chest radiograph."""
    x, y = _grid(size)
    s = anatomy.scale
    body = _ellipse(x, y, 0.0, 0.08, 0.9 * s, 1.05 * s)
    density = 0.05 + 0.40 * body
    right, left = lung_masks(anatomy, size)
    lungs = np.clip(right + left, 0.0, 1.0)
    density -= 0.30 * lungs

    # Ribs: arcs sloping down towards the sides, one family per hemithorax.
    ribs = np.zeros_like(x)
    spacing = 0.16 * s
    for k in range(-7, 8):
        y0 = -0.85 + (k + anatomy.rib_phase) * spacing
        arc = y0 + 0.35 * x**2 + 0.10 * np.abs(x)
        ribs += np.exp(-0.5 * ((y - arc) / (0.022 * s)) ** 2)
    density += 0.10 * np.clip(ribs, 0.0, 1.0) * body * (np.abs(x) > 0.08)

    # Mediastinum, heart and spine.
    heart = _ellipse(x, y, 0.08 + anatomy.heart_shift, 0.30, 0.24 * s, 0.28 * s)
    spine = _ellipse(x, y, 0.0, 0.05, 0.09, 1.1)
    density += 0.30 * np.maximum(heart, spine) * body

    # Vessel-like low-frequency texture inside the lungs.
    tex_rng = np.random.default_rng(anatomy.texture_seed)
    texture = gaussian_blur(tex_rng.standard_normal((size, size)), sigma=size / 40.0)
    texture /= texture.std() + 1e-12
    density += 0.025 * texture * lungs

    if lesion is not None:
        d2 = ((x - lesion.cx) ** 2 + (y - lesion.cy) ** 2) / (2.0 * lesion.radius) ** 2
        blob = np.exp(-2.0 * d2**2)  # flat-topped, soft-edged disc
        density += lesion.contrast * blob

    density = gaussian_blur(density, sigma=size / 256.0)
    return np.clip(density, 0.0, 1.0)
