"""Aggregation strategies the plan can choose, as config objects plus pure functions.

A round turns the sites' updates (deltas: ``local weights - global weights``) into the next
global model in two steps, both pure (no I/O, clock or RNG):

1. :func:`aggregate_deltas` reduces the updates to one delta: the weighted mean (FedAvg,
   FedProx, FedBN and the server optimisers), or a robust estimator (median, trimmed mean).
2. :func:`apply_aggregate` adds it to the global weights, or hands it to a server optimiser,
   which returns new weights and its new state for the coordinator to persist.

Strategies (``TrainingPlan.aggregation`` once wired):

==============  ==========================================================================
``fedavg``      weighted mean by sample count or uniform (McMahan et al., AISTATS 2017)
``fedprox``     FedAvg plus a proximal term ``mu/2 ||w - w_global||^2`` in *local* training
                (Li et al., MLSys 2020); :func:`local_training_options` tells the site ``mu``
``fedadam``     FedAvg's mean as pseudo-gradient of a server optimiser (Reddi et al., ICLR
``fedyogi``     2021, Algorithm 2); see :mod:`shared.aggregation.server_opt`
``fedadagrad``
``fedbn``       FedAvg over everything but normalisation layers, which stay at each site (Li
                et al., ICLR 2021); see :mod:`shared.aggregation.fedbn`. Its
                ``server_momentum`` (beta, default 0) applies the mean with server momentum
                (FedAvgM, Hsu et al. 2019; :mod:`shared.aggregation.server_opt`)
``median``      coordinate-wise median; ``trimmed_mean`` coordinate-wise beta-trimmed mean
                (Yin et al., ICML 2018); sample counts are ignored; see
                :mod:`shared.aggregation.robust`
==============  ==========================================================================

The mean is computed by :class:`~shared.aggregation.FedAvgAccumulator` (the coordinator's
streaming accumulator), so :func:`fedavg` gives the same bits as a streamed round and does not
depend on the order of the updates. Invalid settings raise ``PlanError(code="plan.invalid")``;
combinations that cannot work are refused by :func:`validate_strategy` with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from shared.aggregation._config import choice, invalid, number
from shared.aggregation.fedavg import FedAvgAccumulator
from shared.aggregation.fedbn import local_keys, split_update
from shared.aggregation.robust import (
    check_same_layout,
    check_trim_fraction,
    coordinate_median,
    trim_count,
    trimmed_mean,
)
from shared.aggregation.server_opt import (
    MOMENTUM,
    SERVER_OPTIMISERS,
    ServerOptConfig,
    ServerOptState,
    server_step,
)
from shared.aggregation.validation import TensorLayout
from shared.errors import PlanError, UpdateError

Update = Mapping[str, np.ndarray]

AGGREGATIONS = (
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedbn",
    "median",
    "trimmed_mean",
)
ROBUST = ("median", "trimmed_mean")
WEIGHTINGS = ("samples", "uniform")
_PARAMS: dict[str, tuple[str, ...]] = {
    "fedprox": ("mu",),
    "trimmed_mean": ("trim_fraction",),
    "fedbn": ("server_momentum",),
    **{name: ("eta", "beta1", "beta2", "tau") for name in SERVER_OPTIMISERS},
}
DEFAULT_MAX_ABS = 16.0  # the coordinator's receipt bound (coordinator/aggregation.py)


@dataclass(frozen=True, slots=True, kw_only=True)
class FedAvgConfig:
    """Weighted mean of the deltas; ``weighting`` ``"samples"`` or ``"uniform"``."""

    name: ClassVar[str] = "fedavg"
    weighting: Literal["samples", "uniform"] = "samples"

    def __post_init__(self) -> None:
        choice("weighting", self.weighting, WEIGHTINGS)


@dataclass(frozen=True, slots=True, kw_only=True)
class FedProxConfig:
    """FedAvg aggregation; sites add ``mu/2 * ||w - w_global||^2`` to their loss (Li et al.
    2020 tune ``mu`` in {0.001, 0.01, 0.1, 1}). ``mu > 0``: with 0 it is FedAvg, choose that."""

    name: ClassVar[str] = "fedprox"
    mu: float
    weighting: Literal["samples", "uniform"] = "samples"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mu", number("mu", self.mu, low=0.0, low_open=True))
        choice("weighting", self.weighting, WEIGHTINGS)


@dataclass(frozen=True, slots=True, kw_only=True)
class FedBNConfig:
    """FedAvg over the shared entries; normalisation layers stay local (Li et al. 2021).

    ``server_momentum`` > 0 applies the round's mean with server momentum (FedAvgM, server
    rate 1; Hsu et al. 2019): on the hard heterogeneity benchmark FedBN plateaus after about
    nine rounds because each round moves the model only as far as a site's few local steps;
    momentum 0.5 carries the consistent direction further (``benchmarks/heterogeneity.py``)."""

    name: ClassVar[str] = "fedbn"
    weighting: Literal["samples", "uniform"] = "samples"
    server_momentum: float = 0.0

    def __post_init__(self) -> None:
        choice("weighting", self.weighting, WEIGHTINGS)
        beta = number("server_momentum", self.server_momentum, low=0.0, high=1.0)
        object.__setattr__(self, "server_momentum", beta)

    @property
    def server(self) -> ServerOptConfig | None:
        """The server optimiser that applies the mean (momentum), or ``None`` (plain add)."""
        if not self.server_momentum:
            return None
        return ServerOptConfig(
            optimiser=MOMENTUM, eta=1.0, beta1=self.server_momentum, weighting=self.weighting
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class MedianConfig:
    """Coordinate-wise median (Yin et al. 2018); sample counts are ignored."""

    name: ClassVar[str] = "median"


@dataclass(frozen=True, slots=True, kw_only=True)
class TrimmedMeanConfig:
    """Coordinate-wise trimmed mean dropping ``floor(trim_fraction * n)`` values at each end
    (Yin et al. 2018's beta, ``0 < beta < 0.5``); sample counts are ignored."""

    name: ClassVar[str] = "trimmed_mean"
    trim_fraction: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "trim_fraction", check_trim_fraction(self.trim_fraction))


StrategyConfig = (
    FedAvgConfig | FedProxConfig | FedBNConfig | MedianConfig | TrimmedMeanConfig | ServerOptConfig
)


def make_strategy(
    aggregation: str, params: Mapping[str, Any] | None = None, *, weighting: str = "samples"
) -> StrategyConfig:
    """The config for ``aggregation`` with ``params`` (e.g. ``{"mu": 0.01}``) and the plan's
    ``weighting`` (not used by the robust estimators). ``PlanError(plan.invalid)`` for an
    unknown strategy, unknown parameter or invalid value."""
    choice("aggregation", aggregation, AGGREGATIONS)
    params = dict(params or {})
    allowed: tuple[str, ...] = _PARAMS.get(aggregation, ())
    unknown = sorted(set(params) - set(allowed), key=str)
    if unknown:
        raise PlanError(
            f"Aggregation {aggregation!r} has no setting(s) {', '.join(map(repr, unknown))}; "
            f"it takes {', '.join(map(repr, allowed)) or 'none'}. Correct the plan.",
            code="plan.invalid",
            field="aggregation_params",
        )
    if aggregation == "fedavg":
        return FedAvgConfig(weighting=weighting)  # type: ignore[arg-type]
    if aggregation == "fedprox":
        if "mu" not in params:
            raise invalid("mu", "given for fedprox (a finite number > 0)", None)
        return FedProxConfig(mu=params["mu"], weighting=weighting)  # type: ignore[arg-type]
    if aggregation == "fedbn":
        return FedBNConfig(weighting=weighting, **params)  # type: ignore[arg-type]
    if aggregation == "median":
        return MedianConfig()
    if aggregation == "trimmed_mean":
        return TrimmedMeanConfig(**params)
    return ServerOptConfig(optimiser=aggregation, weighting=weighting, **params)  # type: ignore[arg-type]


def local_training_options(config: StrategyConfig) -> dict[str, Any]:
    """Keyword arguments for the site's ``shared.training.train_local``: ``{"proximal": mu}``
    for FedProx, nothing otherwise. FedBN's site-side duty (keep normalisation layers local) is
    not a training option: see :func:`keeps_norm_layers_local` and :mod:`~.fedbn`."""
    if isinstance(config, FedProxConfig):
        return {"proximal": config.mu}
    return {}


def server_optimiser(config: StrategyConfig) -> ServerOptConfig | None:
    """The optimiser that applies the round's mean on the server and keeps state between
    rounds (``ServerOptState``, persisted by the coordinator), or ``None``: the server
    optimisers themselves, FedBN with ``server_momentum``."""
    if isinstance(config, ServerOptConfig):
        return config
    if isinstance(config, FedBNConfig):
        return config.server
    return None


def keeps_norm_layers_local(config: StrategyConfig) -> bool:
    """Whether sites keep their normalisation layers (FedBN's site-side contract)."""
    return isinstance(config, FedBNConfig)


def local_entries(config: StrategyConfig, names: Iterable[str]) -> frozenset[str]:
    """The entries among ``names`` (the global model's) that stay at each site under
    ``config``: FedBN's normalisation layers (:func:`~.fedbn.local_keys`, by name, so the site,
    the coordinator and plan validation agree), nothing for the other strategies."""
    return local_keys(names) if keeps_norm_layers_local(config) else frozenset()


def upload_layout(config: StrategyConfig, layout: TensorLayout) -> dict[str, Any]:
    """The layout of the updates sites send under ``config``: the global model's, less the
    entries that stay at each site (:func:`local_entries`). The coordinator checks and
    aggregates updates against it, so an update that carries a local entry is refused."""
    return split_update(layout, local_entries(config, layout))[0]


def validate_strategy(
    aggregation: str | StrategyConfig,
    *,
    secure_aggregation: bool,
    compression: str | None,
    norm_layers: Set[str] | bool | None = None,
    min_updates: int | None = None,
) -> None:
    """Refuse combinations that cannot work, with the reason (``PlanError(plan.invalid)``).

    ``norm_layers``: the model's normalisation-layer entries (or whether it has any), needed
    for FedBN. ``min_updates``: the fewest updates a round aggregates (the plan's quorum); when
    given, a robust estimator that would not discard anything is refused.
    ``compression`` is the codec name; only ``"topk..."`` interacts with a strategy here.
    """
    name = aggregation if isinstance(aggregation, str) else aggregation.name
    choice("aggregation", name, AGGREGATIONS)
    estimator = "A coordinate-wise median" if name == "median" else "A trimmed mean"
    if name in ROBUST and secure_aggregation:
        raise PlanError(
            f"{estimator} cannot be computed under secure aggregation: the coordinator only "
            "ever sees the sum of the masked updates, never one site's values, so it cannot "
            "sort them. Choose fedavg (or a server optimiser), or turn secure aggregation off.",
            code="plan.invalid",
            field="aggregation",
        )
    if name in ROBUST and compression is not None and compression.startswith("topk"):
        raise PlanError(
            f"{estimator} does not work with top-k compression: each site sends only its k "
            "largest values and zeros elsewhere, on different coordinates, so per coordinate "
            "most sites report 0; the estimator then returns (nearly) 0 and the model stops "
            "learning, and the error feedback kept at the sites assumes the server adds what "
            "they send. Use fp16 or int8 compression, or fedavg.",
            code="plan.invalid",
            field="compression",
        )
    if name == "fedbn" and not norm_layers:
        raise PlanError(
            "FedBN keeps the normalisation layers that track running statistics (BatchNorm) "
            "local, but this model has none (GroupNorm and LayerNorm keep no statistics of a "
            "site's images), so it would be plain FedAvg. Choose fedavg, or an architecture "
            "with BatchNorm layers.",
            code="plan.invalid",
            field="aggregation",
        )
    if min_updates is not None and name in ROBUST:
        if name == "median" and min_updates < 3:
            raise PlanError(
                f"A median of {min_updates} update(s) is their mean and resists no bad site. "
                "Raise the quorum to at least 3, or choose fedavg.",
                code="plan.invalid",
                field="quorum",
            )
        if name == "trimmed_mean":
            beta = aggregation.trim_fraction if isinstance(aggregation, TrimmedMeanConfig) else 0.1
            if trim_count(beta, min_updates) == 0:
                need = math.ceil(round(1 / beta, 9))
                raise PlanError(
                    f"A {beta:g}-trimmed mean of {min_updates} updates trims nothing (it drops "
                    f"floor({beta:g} * n) at each end). Raise the quorum to at least {need} or "
                    "the trim fraction.",
                    code="plan.invalid",
                    field="quorum",
                )


def fedavg_weights(sample_counts: Sequence[float] | None, weighting: str, n: int) -> list[float]:
    """Each update's share of the mean (summing to 1): its sample count over the total, or
    ``1/n`` for ``"uniform"``. As the coordinator computes them (``w / sum(w)``)."""
    choice("weighting", weighting, WEIGHTINGS)
    if weighting == "uniform":
        raw = [1.0] * n
    else:
        if sample_counts is None or len(sample_counts) != n:
            raise UpdateError(
                f"Weighting by samples needs one sample count per update ({n}); got "
                f"{'none' if sample_counts is None else len(sample_counts)}.",
                code="update.weight",
            )
        raw = []
        for count in sample_counts:
            c = float(count)
            if not (math.isfinite(c) and c > 0):
                raise UpdateError(
                    f"Sample count {count!r} is not a positive finite number. A site reports "
                    "the number of examples it trained on.",
                    code="update.weight",
                )
            raw.append(c)
    total = math.fsum(raw)
    return [w / total for w in raw]


def fedavg(
    updates: Sequence[Update],
    sample_counts: Sequence[float] | None = None,
    *,
    weighting: str = "samples",
    max_abs: float = DEFAULT_MAX_ABS,
) -> dict[str, np.ndarray]:
    """FedAvg's weighted mean of ``updates`` (McMahan et al. 2017), float32, names sorted.

    Computed with :class:`FedAvgAccumulator` exactly as a streamed round (shares of a total
    weight of 1): bit-identical for any order of the updates, within the accumulator's
    ``error_bound`` (about ``2**-22 * max_abs``) of the exact mean. Elements beyond
    ``max_abs`` raise ``UpdateError(update.range)``; mismatched updates ``update.keys`` etc.
    """
    layout = check_same_layout(updates)
    shares = fedavg_weights(sample_counts, weighting, len(updates))
    acc = FedAvgAccumulator(layout, max_abs=max_abs, max_total_weight=1.0 + 1e-9)
    for update, share in zip(updates, shares, strict=True):
        acc.add(update, share)
    return acc.result()


def aggregate_deltas(
    config: StrategyConfig,
    updates: Sequence[Update],
    sample_counts: Sequence[float] | None = None,
    *,
    local: Set[str] = frozenset(),
    max_abs: float = DEFAULT_MAX_ABS,
) -> dict[str, np.ndarray]:
    """The round's aggregated delta under ``config``.

    FedBN: entries named in ``local`` (:func:`~.fedbn.norm_layer_keys` or
    :func:`~.fedbn.local_keys`) are dropped from the updates if present and absent from the
    result. Median and trimmed mean ignore ``sample_counts``.
    """
    if isinstance(config, FedBNConfig):
        updates = [split_update(u, local)[0] for u in updates]
    elif local:
        raise ValueError(f"local keys apply to fedbn only, not to {config.name}")
    if isinstance(config, MedianConfig):
        return coordinate_median(updates)
    if isinstance(config, TrimmedMeanConfig):
        return trimmed_mean(updates, config.trim_fraction)
    return fedavg(updates, sample_counts, weighting=config.weighting, max_abs=max_abs)


def apply_aggregate(
    config: StrategyConfig,
    global_weights: Update,
    delta: Update,
    state: ServerOptState | None = None,
) -> tuple[dict[str, np.ndarray], ServerOptState | None]:
    """Next global weights (and server optimiser state) from the aggregated ``delta``.

    Server optimisers need their ``state`` (``server_opt.initial_state`` in the first round)
    and return the next one; the other strategies add ``delta`` (``global + delta`` in the
    weights' dtype, as the coordinator does) and return ``None``. Entries of
    ``global_weights`` that ``delta`` lacks (FedBN's local layers) are returned unchanged.
    """
    optimiser = server_optimiser(config)
    if optimiser is not None:
        if state is None:
            raise ValueError("a server optimiser needs its state; start from initial_state()")
        return server_step(global_weights, delta, state, optimiser)
    if state is not None:
        raise ValueError(f"{config.name} keeps no server state")
    unknown = set(delta) - set(global_weights)
    if unknown:
        raise UpdateError(
            f"The aggregate names {len(unknown)} tensor(s) the global model lacks, e.g. "
            f"{sorted(unknown)[0]!r}. Aggregate updates made from this global model.",
            code="update.keys",
        )
    out = dict(global_weights)
    for name, d in delta.items():
        if np.shape(d) != np.shape(global_weights[name]):
            raise UpdateError(
                f"The aggregate of {name!r} has shape {np.shape(d)}, the global model's "
                f"{np.shape(global_weights[name])}.",
                code="update.shape",
                tensor=name,
            )
        out[name] = global_weights[name] + d
    return out, None
