"""Example-level differential privacy: DP-SGD in a site's local training, and its accounting.

Theory of operation
-------------------
DP-SGD (Abadi et al., CCS 2016, "Deep Learning with Differential Privacy") protects each
*example* (here: each training image, hence each patient's image) rather than a whole site:
at every optimiser step each example's gradient is clipped to L2 norm ``max_grad_norm`` C,
the clipped gradients are summed, Gaussian noise of standard deviation ``noise_multiplier *
C`` is added, and the sum is divided by the expected batch size. With batches drawn by Poisson
sampling (each of the site's N training images taken independently with probability q) every
step is one sampled Gaussian mechanism, and a round of local training is ``steps`` of them,
composed in RDP by ``shared.privacy.accountant`` exactly as Opacus accounts them.

**The sample rate and steps of a round** follow from the plan and the site's own data:
``q = min(1, batch_size / N)`` and ``steps = local_epochs * ceil(N / batch_size)`` (one
expected pass over the images per epoch). N is the site's training-set size, which only the
site knows, so the epsilon of a plan is computed at the site (``plan_privacy`` with its count)
and every round is charged with the steps it actually took before its update may leave.

**Plans.** The plan's ``dp`` block selects it with ``"level": "example"``::

    "dp": {"level": "example", "noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-5}

(client-level DP, ``shared.privacy.client_dp``, is the block without ``level``, so plans
written before this keep their hashes). Per-example gradients need every layer to treat the
examples of a batch independently: BatchNorm mixes them, so the plan must name an architecture
without it (e.g. ``small_cnn_gn``, GroupNorm); the plan refuses others with the reason.

**Adjacency.** The guarantee is for adding or removing one training image at one site. The
model update carries nothing else about the images, but the update's sample count is sent as
metadata and is not covered by the noise (as for every plan).

Everything here is a pure function; the per-example gradients themselves are computed with
Opacus in ``shared.training``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import PrivacyParameterError
from shared.privacy.accountant import SampledGaussian, get_epsilon
from shared.privacy.client_dp import _positive  # the dp block's one parameter rule

__all__ = [
    "LEVEL",
    "ExampleDP",
    "round_mechanism",
    "run_epsilon",
    "sample_rate",
    "steps_per_round",
]

#: The ``dp`` block's ``level`` that selects DP-SGD.
LEVEL = "example"


@dataclass(frozen=True, slots=True, kw_only=True)
class ExampleDP:
    """A plan's example-level DP settings (DP-SGD): clip each example's gradient to L2 norm
    ``max_grad_norm``, add Gaussian noise of standard deviation ``noise_multiplier *
    max_grad_norm`` to each step's summed gradient, report (epsilon, ``delta``)-DP."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "noise_multiplier", _positive("noise_multiplier", self.noise_multiplier)
        )
        object.__setattr__(self, "max_grad_norm", _positive("max_grad_norm", self.max_grad_norm))
        object.__setattr__(self, "delta", _positive("delta", self.delta, below_one=True))

    @classmethod
    def from_dict(cls, data: Any) -> ExampleDP:
        keys = {"level", "noise_multiplier", "max_grad_norm", "delta"}
        if not isinstance(data, Mapping) or set(data) != keys or data["level"] != LEVEL:
            raise PrivacyParameterError(
                'Example-level dp must be {"level": "example", "noise_multiplier": z, '
                f'"max_grad_norm": C, "delta": d}}, not {data!r}.',
                code="privacy.bad_parameter",
            )
        return cls(
            noise_multiplier=data["noise_multiplier"],
            max_grad_norm=data["max_grad_norm"],
            delta=data["delta"],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": LEVEL,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "delta": self.delta,
        }


def _check_counts(batch_size: int, num_samples: int, local_epochs: int = 1) -> None:
    for name, value in (
        ("batch size", batch_size),
        ("number of training images", num_samples),
        ("number of local epochs", local_epochs),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PrivacyParameterError(
                f"The {name} must be an integer >= 1 for DP-SGD accounting, not {value!r}.",
                code="privacy.bad_parameter",
            )


def sample_rate(batch_size: int, num_samples: int) -> float:
    """Poisson sampling rate of one step: ``batch_size / num_samples``, at most 1."""
    _check_counts(batch_size, num_samples)
    return min(1.0, batch_size / num_samples)


def steps_per_round(local_epochs: int, batch_size: int, num_samples: int) -> int:
    """Optimiser steps of one round: ``ceil(num_samples / batch_size)`` per epoch."""
    _check_counts(batch_size, num_samples, local_epochs)
    return local_epochs * -(-num_samples // batch_size)


def round_mechanism(
    dp: ExampleDP, *, batch_size: int, num_samples: int, steps: int
) -> SampledGaussian:
    """What a round of ``steps`` DP-SGD steps on ``num_samples`` images costs the site."""
    return SampledGaussian(
        noise_multiplier=dp.noise_multiplier,
        sample_rate=sample_rate(batch_size, num_samples),
        steps=steps,
    )


def run_epsilon(
    dp: ExampleDP, *, batch_size: int, local_epochs: int, num_samples: int, rounds: int
) -> float:
    """The epsilon (at ``dp.delta``) a site with ``num_samples`` training images spends over
    ``rounds`` rounds of the plan: ``rounds * steps_per_round`` sampled Gaussian steps."""
    steps = rounds * steps_per_round(local_epochs, batch_size, num_samples)
    return get_epsilon(
        noise_multiplier=dp.noise_multiplier,
        sample_rate=sample_rate(batch_size, num_samples),
        steps=steps,
        delta=dp.delta,
    )[0]
