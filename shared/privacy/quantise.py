"""Clip, quantise and dequantise model updates for secure aggregation.

Theory of operation
-------------------
Pairwise masks cancel only in exact arithmetic, so secure aggregation (Bonawitz et al., CCS
2017, section 3) works on integers modulo ``2**bits``: numpy's unsigned integers wrap exactly
there, so a sum of masked vectors loses nothing however large the masks are.

A site first clips its update to the L2 bound ``clip_norm`` (also what client-level DP needs:
it bounds one site's influence). After clipping every coordinate lies in
``[-clip_norm, clip_norm]``, so with ``scale`` chosen as::

    scale = (2**(bits - 1) * (1 - 2**-40) / max_sites - 2) / clip_norm

each quantised coordinate ``round(x * scale)`` is at most ``clip_norm * scale + 1`` in
magnitude (the +1 covers stochastic rounding up), and the sum of up to ``max_sites`` of them
stays below ``2**(bits - 1)``: read as a two's-complement signed integer it is the true sum,
never wrapped. (The ``2**-40`` and the 2 leave room for float64's rounding of these limits,
which matters at 64 bits.) Dequantising divides by ``scale``.

Rounding is to the nearest integer, or stochastic (Gupta et al. 2015; unbiased, so the sum's
error averages out) when the caller passes a ``numpy.random.Generator``. The error of a sum
of ``n`` updates is at most ``n * 0.5 / scale`` per coordinate when rounding to nearest and
below ``n / scale`` when stochastic, plus float64 rounding that shows only at 64 bits
(:meth:`Quantiser.error_bound`); with 32 bits, 10 sites and a bound of 10 that is about
5e-8 per site.

Work is done in float64, so the rounding happens at the quantisation step, not at float32's
24-bit mantissa.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared.errors import PrivacyParameterError, UpdateError

__all__ = ["RING_DTYPES", "Quantiser", "clip_l2"]

#: Supported rings Z_{2^bits} and the unsigned / signed numpy types that hold them.
RING_DTYPES: dict[int, tuple[type[np.unsignedinteger], type[np.signedinteger]]] = {
    16: (np.uint16, np.int16),
    32: (np.uint32, np.int32),
    64: (np.uint64, np.int64),
}


def _as_finite_float(update: np.ndarray) -> np.ndarray:
    arr = np.asarray(update)
    if arr.dtype.kind != "f":
        raise UpdateError(
            f"A model update must hold floating-point numbers, not {arr.dtype}.",
            code="update.dtype",
        )
    if not np.all(np.isfinite(arr)):
        raise UpdateError(
            "This model update contains NaN or infinite values, so it cannot be sent; "
            "training diverged. Check the learning rate in the plan.",
            code="update.not_finite",
        )
    return arr.reshape(-1)


def clip_l2(update: np.ndarray, clip_norm: float) -> np.ndarray:
    """``update`` scaled down to L2 norm ``clip_norm`` if it is longer (float64 copy).

    The scaling of Abadi et al. 2016 / McMahan et al. 2018 ("Learning Differentially Private
    Recurrent Language Models"): direction kept, norm at most the bound.
    """
    _check_clip_norm(clip_norm)
    flat = _as_finite_float(update).astype(np.float64)
    norm = math.sqrt(float(np.dot(flat, flat)))
    if norm > clip_norm:
        flat *= clip_norm / norm
    return flat


def _check_clip_norm(clip_norm: float) -> None:
    if (
        isinstance(clip_norm, bool)
        or not isinstance(clip_norm, int | float)
        or not math.isfinite(clip_norm)
        or clip_norm <= 0
    ):
        raise PrivacyParameterError(
            f"The clipping bound must be a finite number > 0 (the plan's norm bound), not "
            f"{clip_norm!r}.",
            code="privacy.bad_clip_norm",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Quantiser:
    """Fixed-point encoding of clipped updates in Z_{2^bits} for up to ``max_sites`` sites."""

    clip_norm: float
    max_sites: int
    bits: int = 32

    def __post_init__(self) -> None:
        _check_clip_norm(self.clip_norm)
        if isinstance(self.bits, bool) or self.bits not in RING_DTYPES:
            raise PrivacyParameterError(
                f"Secure aggregation works modulo 2**16, 2**32 or 2**64; bits={self.bits!r} "
                "is not one of them.",
                code="privacy.bad_bits",
            )
        if (
            isinstance(self.max_sites, bool)
            or not isinstance(self.max_sites, int)
            or self.max_sites < 1
        ):
            raise PrivacyParameterError(
                f"max_sites must be a whole number >= 1, not {self.max_sites!r}.",
                code="privacy.bad_parameter",
            )
        if self.scale * self.clip_norm < 1:
            raise PrivacyParameterError(
                f"{self.bits} bits leave no room to sum {self.max_sites} updates exactly; "
                "use more bits or fewer sites.",
                code="privacy.bad_bits",
            )

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return RING_DTYPES[self.bits][0]

    @property
    def signed_dtype(self) -> type[np.signedinteger]:
        return RING_DTYPES[self.bits][1]

    @property
    def scale(self) -> float:
        """Integer steps per unit: the largest for which ``max_sites`` sums cannot wrap."""
        return (2 ** (self.bits - 1) * (1 - 2**-40) / self.max_sites - 2) / self.clip_norm

    def error_bound(self, n_summed: int, *, stochastic: bool) -> float:
        """Largest per-coordinate error of a dequantised sum of ``n_summed`` clipped updates.

        Rounding to integers, plus float64's own rounding when scaling (a relative 2**-52 of
        values up to ``clip_norm``), which only shows at 64 bits where the integer step is
        finer than float64 can resolve.
        """
        rounding = (1.0 if stochastic else 0.5) / self.scale
        return n_summed * (rounding + self.clip_norm * 2.0**-51)

    def quantise(self, update: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Clip ``update`` (flattened) and encode it as ring elements (``dtype``).

        Rounds to nearest without ``rng``, stochastically with it.
        """
        flat = clip_l2(update, self.clip_norm)  # float64 copy, norm <= clip_norm
        flat *= self.scale
        if rng is None:
            np.rint(flat, out=flat)
        else:
            flat += rng.random(flat.shape[0])
            np.floor(flat, out=flat)
        # Float rounding in the norm can push a coordinate a hair past the bound; the sum's
        # no-wrap guarantee needs the integer bound to hold exactly.
        limit = math.floor(self.clip_norm * self.scale) + 1
        np.clip(flat, -limit, limit, out=flat)
        return flat.astype(self.signed_dtype).view(self.dtype)

    def dequantise(self, total: np.ndarray, n_summed: int) -> np.ndarray:
        """The float64 sum of ``n_summed`` updates from the ring sum of their encodings."""
        if isinstance(n_summed, bool) or not 0 < n_summed <= self.max_sites:
            raise PrivacyParameterError(
                f"This quantiser sums 1 to {self.max_sites} updates exactly, not {n_summed!r}.",
                code="privacy.bad_parameter",
            )
        arr = np.asarray(total)
        if arr.dtype != self.dtype:
            raise UpdateError(
                f"A {self.bits}-bit secure sum must be {np.dtype(self.dtype).name}, not "
                f"{arr.dtype}.",
                code="update.dtype",
            )
        out = arr.view(self.signed_dtype).astype(np.float64)
        out /= self.scale
        return out
