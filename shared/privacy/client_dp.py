"""Client-level differential privacy: a site clips its model update and adds Gaussian noise.

Theory of operation
-------------------
DP-FedAvg (McMahan, Ramage, Talwar and Zhang, ICLR 2018, "Learning Differentially Private
Recurrent Language Models") protects a whole participant's data: each round a site clips its
update (new weights minus global weights, every floating-point entry, buffers included) to L2
norm at most ``clip_norm`` C, so whatever its data the update moves by at most C, and adds
Gaussian noise. One round is then the Gaussian mechanism (Dwork and Roth 2014, appendix A) with
L2 sensitivity C; ``rounds`` rounds compose in RDP (``shared.privacy.accountant``).

**Where the noise goes (plain aggregation).** Without secure aggregation the coordinator
receives each site's update on its own, so the sum's noise protects nobody: each site must add
the *full* noise, standard deviation ``noise_multiplier * clip_norm`` per coordinate, to its
own update, and its guarantee then holds whatever the coordinator and the other sites do
(post-processing). Under secure aggregation the coordinator would only see the sum, and each of
n sites could add a share of standard deviation ``z C / sqrt(n)`` so that the sum carries the
full noise; ``shared.privacy.secagg_plan`` does so under a plan's ``secure_aggregation``.

**The accounting.** Each site takes part in every round it is invited to (sample rate 1: no
amplification by sampling is claimed), once per round, so a run of R rounds costs the site
``get_epsilon(noise_multiplier=z, sample_rate=1.0, steps=R, delta=delta)``: the plain
Gaussian mechanism composed R times (alpha * R / (2 z^2) in RDP). The adjacency is the usual
client-level one of DP-FedAvg and Opacus (the site's contribution present or absent: the update
moves by at most C). Two data sets of the same site, which may differ entirely, move the
clipped update by up to 2C; that reading is covered at noise multiplier z / 2.

**Weighting.** The plan must weight the updates equally (``weighting: "uniform"``): a weight
by sample count uses the site's number of images, which is a fact about its data that the
noise does not cover, and under secure aggregation a large weight would scale a site's signal
past its share of the noise. Equal weights keep both cases sound, and with plain aggregation
averaging k noisy updates divides the noise in the global model by sqrt(k).

Everything here is a pure function over arrays; the caller supplies the random generator
(seeded from ``os.urandom`` in production, from a fixed seed in tests).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.errors import PrivacyParameterError
from shared.privacy.accountant import SampledGaussian, get_epsilon

__all__ = [
    "ClientDP",
    "ClipReport",
    "clip_and_noise",
    "protections",
    "round_mechanism",
    "run_epsilon",
    "secure_rng",
]

#: The noise this slice adds is the site's full share (plain aggregation).
PER_ROUND_SAMPLE_RATE = 1.0


def _positive(name: str, value: Any, *, below_one: bool = False) -> float:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value > 0
        and (not below_one or value < 1)
    )
    if not ok:
        allowed = "a number strictly between 0 and 1" if below_one else "a finite number > 0"
        raise PrivacyParameterError(
            f"dp.{name} must be {allowed}, not {value!r}.", code="privacy.bad_parameter"
        )
    return float(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientDP:
    """A plan's client-level DP settings: clip each site's update to L2 norm ``clip_norm``,
    add Gaussian noise of standard deviation ``noise_multiplier * clip_norm`` per coordinate,
    report (epsilon, ``delta``)-DP."""

    clip_norm: float
    noise_multiplier: float
    delta: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip_norm", _positive("clip_norm", self.clip_norm))
        object.__setattr__(
            self, "noise_multiplier", _positive("noise_multiplier", self.noise_multiplier)
        )
        object.__setattr__(self, "delta", _positive("delta", self.delta, below_one=True))

    @classmethod
    def from_dict(cls, data: Any) -> ClientDP:
        keys = {"clip_norm", "noise_multiplier", "delta"}
        if not isinstance(data, Mapping) or set(data) != keys:
            raise PrivacyParameterError(
                'dp must be null or an object {"clip_norm": C, "noise_multiplier": z, '
                f'"delta": d}}, not {data!r}.',
                code="privacy.bad_parameter",
            )
        return cls(**{k: data[k] for k in keys})

    def to_dict(self) -> dict[str, float]:
        return {
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
        }

    @property
    def noise_std(self) -> float:
        """The standard deviation each site adds per coordinate (its full share)."""
        return self.noise_multiplier * self.clip_norm


def round_mechanism(dp: ClientDP) -> SampledGaussian:
    """What one round costs a site: one Gaussian mechanism at sample rate 1."""
    return SampledGaussian(
        noise_multiplier=dp.noise_multiplier, sample_rate=PER_ROUND_SAMPLE_RATE, steps=1
    )


def run_epsilon(dp: ClientDP, rounds: int) -> float:
    """The epsilon a site spends over ``rounds`` rounds at the plan's delta."""
    return get_epsilon(
        noise_multiplier=dp.noise_multiplier,
        sample_rate=PER_ROUND_SAMPLE_RATE,
        steps=rounds,
        delta=dp.delta,
    )[0]


@dataclass(frozen=True, slots=True)
class ClipReport:
    """``norm``: the update's L2 norm before clipping; ``clipped_norm``: after (at most the
    bound); ``noise_std``: the per-coordinate noise added."""

    norm: float
    clipped_norm: float
    noise_std: float

    @property
    def clipped(self) -> bool:
        return self.norm > self.clipped_norm


def secure_rng() -> np.random.Generator:
    """A generator seeded from the operating system's CSPRNG: the noise must be unpredictable
    to anyone who could subtract it (numpy's PCG64 from 256 fresh bits)."""
    return np.random.default_rng(int.from_bytes(os.urandom(32), "little"))


def clip_and_noise(
    update: MutableMapping[str, np.ndarray], dp: ClientDP, rng: np.random.Generator
) -> ClipReport:
    """Clip ``update`` (all its arrays together, as one vector) to ``dp.clip_norm`` and add
    N(0, (z C)^2) to every coordinate, in place (float32 arrays stay float32).

    The norm is summed in float64 so large models do not lose precision; the noise is drawn
    in float64 and added once, per array, so peak extra memory is one array's size.
    """
    total = 0.0
    for name, array in update.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise PrivacyParameterError(
                f"Update entry {name!r} is {array.dtype}; only floating-point entries can be "
                "clipped and noised.",
                code="privacy.bad_parameter",
            )
        total += float(np.dot(array.reshape(-1).astype(np.float64), array.reshape(-1)))
    norm = math.sqrt(total)
    if not math.isfinite(norm):
        raise PrivacyParameterError(
            "The update holds NaN or infinite values and cannot be clipped; training diverged.",
            code="privacy.bad_parameter",
        )
    scale = min(1.0, dp.clip_norm / norm) if norm > 0 else 1.0
    std = dp.noise_std
    for name in sorted(update):  # a fixed order: the same seed gives the same noise
        array = update[name]
        noisy = array.astype(np.float64) * scale + rng.normal(0.0, std, size=array.shape)
        if array.flags.writeable and array.flags.c_contiguous:
            np.copyto(array, noisy, casting="same_kind")
        else:
            update[name] = noisy.astype(array.dtype)
    return ClipReport(norm=norm, clipped_norm=norm * scale, noise_std=std)


def protections(plan: Mapping[str, Any]) -> list[str]:
    """The protections a plan (as ``TrainingPlan.to_dict()``) gives each site, one sentence
    each, for the operator's ``status`` and the ethics board's report: both say the same."""
    if plan.get("secure_aggregation"):
        secure = "Secure aggregation: the coordinator sees only the sum of the sites' updates."
    elif plan.get("homomorphic"):
        secure = (
            "Homomorphic encryption: each site's model leaves it encrypted under a key only "
            "the sites hold; the coordinator averages the encrypted models without reading "
            "them, and only the sites can read the result."
        )
    else:
        secure = "No secure aggregation: the coordinator sees each site's individual update."
    raw = plan.get("dp")
    if not raw:
        return [
            secure,
            "No differential privacy: no privacy budget (epsilon) is spent or claimed.",
        ]
    if isinstance(raw, Mapping) and "level" in raw:
        from shared.privacy.dp_sgd import ExampleDP

        example = ExampleDP.from_dict(raw)
        return [
            secure,
            f"Example-level differential privacy (DP-SGD): during local training each site "
            f"clips every training image's gradient to L2 norm {example.max_grad_norm:g} and "
            f"adds Gaussian noise (noise multiplier {example.noise_multiplier:g}) at every "
            f"step; the epsilon a site spends over {int(plan['rounds'])} round(s) depends on "
            f"its number of training images (at delta {example.delta:g}), so each site "
            "computes it and refuses any round beyond its own cap (RDP accountant).",
        ]
    dp = ClientDP.from_dict(raw)
    rounds = int(plan["rounds"])
    epsilon = run_epsilon(dp, rounds)
    noise = (
        f"its share of Gaussian noise, so that the sum the coordinator sees carries noise of "
        f"standard deviation {dp.noise_std:.3g}"
        if plan.get("secure_aggregation")
        else f"Gaussian noise of standard deviation {dp.noise_std:.3g}"
    )
    return [
        secure,
        f"Client-level differential privacy: each site clips its update to L2 norm "
        f"{dp.clip_norm:g} and adds {noise} "
        f"(noise multiplier {dp.noise_multiplier:g}) before it leaves the site; over "
        f"{rounds} round(s) a site spends at most epsilon {epsilon:.4g} at delta {dp.delta:g} "
        "(RDP accountant, every round counted).",
    ]
