"""Rényi-DP accountant for the (Poisson-)subsampled Gaussian mechanism.

Theory of operation
-------------------
One application of the sampled Gaussian mechanism (SGM) takes each record (an example in
DP-SGD, a site in client-level DP) with probability ``q``, sums the clipped contributions and
adds Gaussian noise of standard deviation ``noise_multiplier`` times the clipping bound. Its
Rényi differential privacy (Mironov 2017, "Rényi Differential Privacy") at order ``alpha`` is
computed as in Mironov, Talwar and Zhang 2019, "Rényi Differential Privacy of the Sampled
Gaussian Mechanism" (arXiv:1908.10530, section 3.3): ``log(A_alpha) / (alpha - 1)``, with the
binomial expansion for integer orders and the two-sided erfc series for fractional ones.
Full participation (``q == 1``) is the plain Gaussian mechanism, ``alpha / (2 sigma^2)``.

RDP composes by addition at every order, so ``steps`` applications cost ``steps`` times one,
and rounds with different settings add their RDP vectors (:class:`PrivacyBudget` does that).
The (epsilon, delta) guarantee is the best over the orders of the conversion of Balle et al.
2020, "Hypothesis Testing Interpretations and Renyi Differential Privacy" (Theorem 21)::

    eps(alpha) = rdp(alpha) - (log(delta) + log(alpha)) / (alpha - 1) + log((alpha - 1) / alpha)

This is what Opacus (1.6, ``opacus.accountants.analysis.rdp``) computes with the same default
orders, so a site sees the same epsilon here as the field's library would report; a test
checks the two agree. We do not import Opacus (or SciPy) at run time: the few special
functions needed (``log erfc``, real binomial coefficients) are written out below with the
standard library.

Everything here is a pure function of its arguments; invalid settings raise
:class:`~shared.errors.PrivacyParameterError` with a message that says what is allowed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.errors import PrivacyBudgetExceeded, PrivacyParameterError

__all__ = [
    "DEFAULT_ORDERS",
    "PrivacyBudget",
    "SampledGaussian",
    "compute_rdp",
    "epsilon_from_rdp",
    "get_epsilon",
]

#: Opacus's ``RDPAccountant.DEFAULT_ALPHAS``: fine steps below 11, integers up to 63.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]
)

_LOG_TERM_CUTOFF = -30.0  # the fractional-order series stops below exp(-30), as in Opacus


# --- validation --------------------------------------------------------------------------


def _check_sample_rate(q: float) -> float:
    if isinstance(q, bool) or not isinstance(q, int | float) or not 0.0 <= q <= 1.0:
        raise PrivacyParameterError(
            f"The sample rate must be a number from 0 to 1 (the share of records, or sites, "
            f"taking part in each step), not {q!r}. Use 1 for full participation.",
            code="privacy.bad_sample_rate",
        )
    return float(q)


def _check_noise(noise_multiplier: float) -> float:
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, int | float)
        or not math.isfinite(noise_multiplier)
        or noise_multiplier < 0
    ):
        raise PrivacyParameterError(
            f"The noise multiplier must be a finite number >= 0 (the noise's standard "
            f"deviation over the clipping bound), not {noise_multiplier!r}.",
            code="privacy.bad_noise_multiplier",
        )
    return float(noise_multiplier)


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 0:
        raise PrivacyParameterError(
            f"The number of steps must be a whole number >= 0, not {steps!r}.",
            code="privacy.bad_steps",
        )
    return int(steps)


def _check_delta(delta: float) -> float:
    if (
        isinstance(delta, bool)
        or not isinstance(delta, int | float)
        or not math.isfinite(delta)
        or not 0.0 < delta < 1.0
    ):
        raise PrivacyParameterError(
            f"delta must be strictly between 0 and 1 (usually well below 1 / number of "
            f"records, e.g. 1e-5), not {delta!r}.",
            code="privacy.bad_delta",
        )
    return float(delta)


def _check_orders(orders: Sequence[float]) -> np.ndarray:
    try:
        vec = np.asarray(orders, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise PrivacyParameterError(
            f"RDP orders must be a sequence of numbers > 1, not {orders!r}.",
            code="privacy.bad_orders",
        ) from exc
    if vec.size == 0 or not np.all(np.isfinite(vec)) or not np.all(vec > 1.0):
        raise PrivacyParameterError(
            "RDP orders must be a non-empty sequence of finite numbers > 1 (leave them out to "
            "use the default orders, the same as Opacus).",
            code="privacy.bad_orders",
        )
    return vec


# --- log-space arithmetic ---------------------------------------------------------------


def _log_add(logx: float, logy: float) -> float:
    a, b = min(logx, logy), max(logx, logy)
    if a == -math.inf:
        return b
    return math.log1p(math.exp(a - b)) + b


def _log_sub(logx: float, logy: float) -> float:
    """log(exp(logx) - exp(logy)) for logx >= logy (the series' terms shrink, so it holds)."""
    if logy == -math.inf:
        return logx
    if logx <= logy:
        return -math.inf
    try:
        return math.log(math.expm1(logx - logy)) + logy
    except OverflowError:
        return logx


def _log_erfc(x: float) -> float:
    """log(erfc(x)), accurate where erfc underflows (x beyond ~26).

    Past x = 25 we use the asymptotic series erfc(x) ~ exp(-x^2) / (x sqrt(pi)) *
    (1 - 1/(2x^2) + 3/(4x^4) - 15/(8x^6) + 105/(16x^8)); its error there is below 1e-12.
    """
    if x < 25.0:
        return math.log(math.erfc(x))
    inv = 1.0 / (x * x)
    series = 1.0 - inv / 2 + 3 * inv**2 / 4 - 15 * inv**3 / 8 + 105 * inv**4 / 16
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log(series)


# --- RDP of one step -----------------------------------------------------------------------


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log(A_alpha) for integer alpha (Mironov et al. 2019, section 3.3)."""
    log_a = -math.inf
    log_q, log_1q = math.log(q), math.log1p(-q)
    for i in range(alpha + 1):
        log_coef = math.log(math.comb(alpha, i)) + i * log_q + (alpha - i) * log_1q
        log_a = _log_add(log_a, log_coef + (i * i - i) / (2 * sigma**2))
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """log(A_alpha) for fractional alpha: the two integrals split at z0, each a series."""
    log_a0, log_a1 = -math.inf, -math.inf
    log_q, log_1q = math.log(q), math.log1p(-q)
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    # binom(alpha, i) for real alpha, kept as sign and log of the magnitude.
    sign, log_abs_coef = 1.0, 0.0
    i = 0
    while True:
        j = alpha - i
        log_t0 = log_abs_coef + i * log_q + j * log_1q
        log_t1 = log_abs_coef + j * log_q + i * log_1q
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        if sign > 0:
            log_a0 = _log_add(log_a0, log_s0)
            log_a1 = _log_add(log_a1, log_s1)
        else:
            log_a0 = _log_sub(log_a0, log_s0)
            log_a1 = _log_sub(log_a1, log_s1)
        if max(log_s0, log_s1) < _LOG_TERM_CUTOFF:
            break
        # binom(alpha, i + 1) = binom(alpha, i) * (alpha - i) / (i + 1)
        if alpha - i < 0:
            sign = -sign
        log_abs_coef += math.log(abs(alpha - i)) - math.log(i + 1)
        i += 1
    return _log_add(log_a0, log_a1)


def _rdp_one_step(q: float, sigma: float, alpha: float) -> float:
    if q == 0.0:
        return 0.0
    if sigma == 0.0:
        return math.inf  # no noise, no privacy
    if q == 1.0:
        return alpha / (2 * sigma**2)
    log_a = _log_a_int(q, sigma, int(alpha)) if alpha.is_integer() else _log_a_frac(q, sigma, alpha)
    return log_a / (alpha - 1)


# --- public API ---------------------------------------------------------------------------


def compute_rdp(
    q: float,
    noise_multiplier: float,
    steps: int,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> np.ndarray:
    """RDP at each order of ``steps`` applications of the sampled Gaussian mechanism.

    ``q`` is the sampling rate (1 for full participation), ``noise_multiplier`` the noise's
    standard deviation over the L2 sensitivity. Returns float64, one value per order; values
    may be ``inf`` (no noise).
    """
    q = _check_sample_rate(q)
    sigma = _check_noise(noise_multiplier)
    steps = _check_steps(steps)
    alphas = _check_orders(orders)
    if steps == 0 or q == 0.0:
        return np.zeros(alphas.shape, dtype=np.float64)
    return np.array(_rdp_curve(q, sigma, tuple(alphas.tolist())), dtype=np.float64) * steps


@functools.lru_cache(maxsize=256)
def _rdp_curve(q: float, sigma: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    """One step's RDP curve, cached: a budget re-reads every past round at each question, and
    a plan's rounds share their settings, so the same few curves are asked for again and
    again (each costs up to ~0.1 s of series)."""
    return tuple(_rdp_one_step(q, sigma, a) for a in orders)


def epsilon_from_rdp(
    rdp: Sequence[float] | np.ndarray,
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> tuple[float, float]:
    """(epsilon, best order) for an RDP curve at ``delta`` (Balle et al. 2020, Theorem 21).

    An all-zero curve (nothing spent) gives ``(0.0, nan)``: no order is involved. An epsilon
    that the conversion puts below zero is reported as 0, the smallest meaningful value.
    """
    delta = _check_delta(delta)
    alphas = _check_orders(orders)
    curve = np.asarray(rdp, dtype=np.float64).reshape(-1)
    if curve.shape != alphas.shape:
        raise PrivacyParameterError(
            f"The RDP curve has {curve.size} values but there are {alphas.size} orders; "
            "compute it with compute_rdp over the same orders.",
            code="privacy.bad_orders",
        )
    if np.any(np.isnan(curve)) or np.any(curve < 0):
        raise PrivacyParameterError(
            "An RDP curve has values >= 0 (or inf); this one does not. Compute it with "
            "compute_rdp.",
            code="privacy.bad_parameter",
        )
    if not np.any(curve):
        return 0.0, math.nan
    with np.errstate(invalid="ignore"):
        eps = (
            curve
            - (math.log(delta) + np.log(alphas)) / (alphas - 1)
            + np.log((alphas - 1) / alphas)
        )
    if not np.any(np.isfinite(eps)):
        return math.inf, math.nan
    best = int(np.nanargmin(eps))
    return max(float(eps[best]), 0.0), float(alphas[best])


def get_epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> tuple[float, float]:
    """(epsilon, best order) after ``steps`` steps at ``sample_rate`` with this noise.

    The same figure as Opacus's ``RDPAccountant.get_privacy_spent(delta=...)`` after
    ``steps`` calls of ``step(noise_multiplier=..., sample_rate=...)``.
    """
    rdp = compute_rdp(sample_rate, noise_multiplier, steps, orders)
    return epsilon_from_rdp(rdp, delta, orders)


@dataclass(frozen=True, slots=True, kw_only=True)
class SampledGaussian:
    """``steps`` applications of the sampled Gaussian mechanism: what one round spends.

    For client-level DP over a round, ``steps`` is 1 and ``sample_rate`` is the share of sites
    selected; for DP-SGD inside local training, ``steps`` is the number of optimiser steps and
    ``sample_rate`` the batch size over the site's number of examples.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int = 1

    def __post_init__(self) -> None:
        _check_noise(self.noise_multiplier)
        _check_sample_rate(self.sample_rate)
        _check_steps(self.steps)

    def rdp(self, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
        return compute_rdp(self.sample_rate, self.noise_multiplier, self.steps, orders)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyBudget:
    """A site's epsilon cap at a fixed delta, and what its rounds have spent so far.

    Spending is composed in RDP (sum of the rounds' curves, then one conversion), which is
    much tighter than adding each round's epsilon: 100 rounds at epsilon 1 each cost far less
    than epsilon 100. So the budget keeps the rounds themselves, and a round is judged by the
    total epsilon *after* it (:meth:`epsilon_after`), not by its own epsilon. Immutable:
    :meth:`charge` returns the budget with the round added.
    """

    cap: float
    delta: float
    spent_rounds: tuple[SampledGaussian, ...] = ()
    orders: tuple[float, ...] = field(default=DEFAULT_ORDERS, repr=False)

    def __post_init__(self) -> None:
        if (
            isinstance(self.cap, bool)
            or not isinstance(self.cap, int | float)
            or math.isnan(self.cap)
            or self.cap <= 0
        ):
            raise PrivacyParameterError(
                f"A site's epsilon cap must be a number > 0 (inf for no cap), not {self.cap!r}.",
                code="privacy.bad_cap",
            )
        _check_delta(self.delta)
        _check_orders(self.orders)
        for r in self.spent_rounds:
            if not isinstance(r, SampledGaussian):
                raise PrivacyParameterError(
                    f"Spent rounds must be SampledGaussian, not {type(r).__name__}.",
                    code="privacy.bad_parameter",
                )

    def _rdp(self, extra: SampledGaussian | None = None) -> np.ndarray:
        total = np.zeros(len(self.orders), dtype=np.float64)
        for r in (*self.spent_rounds, *([extra] if extra is not None else [])):
            total += r.rdp(self.orders)
        return total

    @property
    def spent(self) -> float:
        """Epsilon spent so far (at ``delta``), 0 before the first round."""
        return epsilon_from_rdp(self._rdp(), self.delta, self.orders)[0]

    @property
    def remaining(self) -> float:
        return max(self.cap - self.spent, 0.0)

    def epsilon_after(self, next_round: SampledGaussian) -> float:
        """The total epsilon spent once ``next_round`` is done."""
        return epsilon_from_rdp(self._rdp(next_round), self.delta, self.orders)[0]

    def would_exceed(self, next_round: SampledGaussian) -> bool:
        """True if taking part in ``next_round`` would take the total past the cap."""
        return self.epsilon_after(next_round) > self.cap

    def charge(self, next_round: SampledGaussian) -> PrivacyBudget:
        """The budget after ``next_round``; raises ``PrivacyBudgetExceeded`` if it would pass
        the cap (the site must then refuse the round)."""
        after = self.epsilon_after(next_round)
        if after > self.cap:
            raise PrivacyBudgetExceeded(
                f"Taking part in this round would bring the privacy spent to epsilon "
                f"{after:.3g}, beyond this site's limit of {self.cap:.3g} (delta "
                f"{self.delta:.3g}; {self.spent:.3g} spent so far). The round was refused; "
                "the site's policy or the plan's noise must change for the site to go on.",
                spent=self.spent,
                after=after,
                cap=self.cap,
            )
        return PrivacyBudget(
            cap=self.cap,
            delta=self.delta,
            spent_rounds=(*self.spent_rounds, next_round),
            orders=self.orders,
        )
