"""Training plans: the declarative, hashable description of one federated run.

A plan carries no code: it names an architecture from the registry and settings that every site
checks and approves by the hash of the plan's canonical JSON (DESIGN.md "Governance"). A plan
that cannot be built is refused here, in ``__post_init__``, so an invalid plan cannot exist.
Values are normalised on the way in (ints given for float fields become floats, ``min_sites``
defaults to ``quorum``, preprocessing is sorted) so equal plans have equal hashes however they
were written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from shared.aggregation import (
    AGGREGATIONS,
    local_keys,
    local_training_options,
    make_strategy,
    validate_strategy,
)
from shared.canonical import canonical_json, sha256_hex
from shared.compression import Codec, get_codec, validate_compression
from shared.errors import PlanError, PrivacyParameterError
from shared.models.registry import get_architecture, resolve_hyperparameters
from shared.privacy.client_dp import ClientDP, run_epsilon
from shared.privacy.dp_sgd import ExampleDP
from shared.types import PlanHash

PreprocessValue = str | int | float | bool | None

TASKS = ("binary_classification",)
OPTIMISERS = ("sgd", "adam")
WEIGHTINGS = ("samples", "uniform")
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 32, 512
MAX_SEED = 2**63 - 1


class FrozenMap(Mapping[str, PreprocessValue]):
    """A read-only, hashable mapping with sorted keys (``TrainingPlan.preprocessing`` and
    ``aggregation_params``)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, PreprocessValue] | None = None) -> None:
        self._items: tuple[tuple[str, PreprocessValue], ...] = tuple(sorted((items or {}).items()))

    def __getitem__(self, key: str) -> PreprocessValue:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({dict(self._items)!r})"


def _invalid(name: str, allowed: str, value: Any) -> PlanError:
    return PlanError(
        f"Plan field {name!r} must be {allowed}; got {value!r}. Correct it in the plan.",
        code="plan.invalid",
        field=name,
    )


def _check_str(name: str, value: Any, *, choices: tuple[str, ...] | None = None) -> None:
    if choices is not None:
        if value not in choices or not isinstance(value, str):
            raise _invalid(name, "one of " + ", ".join(repr(c) for c in choices), value)
    elif not isinstance(value, str) or not value.strip():
        raise _invalid(name, "a non-empty string", value)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    allowed = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    if not isinstance(value, int) or isinstance(value, bool):
        raise _invalid(name, allowed, value)
    if value < low or (high is not None and value > high):
        raise _invalid(name, allowed, value)


def _float(name: str, value: Any, allowed: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise _invalid(name, allowed, value)
    return float(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingPlan:
    """One federated training run. FedAvg (McMahan et al., AISTATS 2017): each round,
    ``min_sites`` sites are invited, each trains ``local_epochs`` epochs from the global weights,
    and the round closes once ``quorum`` updates arrived (or fails at ``round_deadline_s``);
    updates are averaged weighted by sample count (``"samples"``) or equally (``"uniform"``).
    ``aggregation`` chooses the strategy (``shared.aggregation.AGGREGATIONS``: FedAvg, FedProx,
    the server optimisers, the robust estimators) and ``aggregation_params`` its settings, e.g.
    ``{"mu": 0.01}`` for FedProx; combinations that cannot work are refused with the reason.
    ``max_update_norm`` bounds an update's L2 norm; larger updates are rejected.
    ``architecture_params`` sets the architecture's integer settings declared in the registry
    (e.g. ``{"width": 4873}`` for ``mlp``); omitted ones take the registry's defaults, which
    are written into the plan so that equal models have equal plan hashes.

    ``dp`` turns on client-level differential privacy (``shared.privacy.client_dp``, DP-FedAvg
    of McMahan et al. 2018): ``{"clip_norm": C, "noise_multiplier": z, "delta": d}``; each
    site clips its update to L2 norm C and adds Gaussian noise of standard deviation z*C to
    it (its full share: without secure aggregation the coordinator sees each update), and the
    run costs each site the epsilon of ``rounds`` Gaussian mechanisms at sample rate 1. It
    needs equal weighting and no ``max_update_norm`` (the reasons are in the refusals).
    With ``"level": "example"`` the block selects example-level DP-SGD in local training
    instead (``shared.privacy.dp_sgd``: ``{"level": "example", "noise_multiplier": z,
    "max_grad_norm": C, "delta": d}``): its epsilon depends on each site's number of images,
    so each site computes it (``epsilon`` is ``None``), and it needs an architecture without
    BatchNorm and no proximal term.
    ``secure_aggregation`` masks each site's update (Bonawitz et al., CCS 2017,
    ``shared.privacy.secagg``) so that the coordinator only sees the sum; it needs at least 3
    sites, equal weighting, no compression and a bound on each update (``max_update_norm`` or
    client-level ``dp``'s ``clip_norm``); each site then adds only its share of the DP noise.
    ``homomorphic`` encrypts instead (CKKS, ``shared.privacy.he_rounds``): the sites share a
    key the coordinator never holds, each uploads its local model encrypted, the coordinator
    averages them without decrypting and the sites decrypt the next global model. It needs
    at least 2 sites, fedavg or fedprox (a weighted mean: no median, server optimiser or
    local layers), no compression, no ``max_update_norm`` (an encrypted model cannot be
    measured) and an architecture without BatchNorm (its counters are integers).

    ``compression`` names the codec each site encodes its update with and the coordinator
    decodes before aggregating (``shared.compression.get_codec``: ``"none"``, ``"fp16"``,
    ``"int8"``, ``"topk:<fraction>"``, ``"topk:<fraction>+int8"``, each optionally ``+zstd``);
    top-k keeps what it did not send at the site (error feedback). It is stored in its
    canonical spelling, so equal codecs give equal plan hashes. ``dp``, ``secure_aggregation``
    and ``compression`` are left out of the canonical JSON at their defaults (null, false,
    ``"none"``), so plans written before them keep their hashes.

    ``aggregation: "fedbn"`` (Li et al., ICLR 2021) needs an architecture with normalisation
    layers that track running statistics (BatchNorm): their entries stay at each site
    (``shared.aggregation.fedbn``)."""

    name: str
    task: Literal["binary_classification"] = "binary_classification"
    label_column: str = "label"
    architecture: str
    architecture_version: str
    architecture_params: Mapping[str, PreprocessValue] = field(default_factory=FrozenMap)
    input_size: int
    preprocessing: Mapping[str, PreprocessValue] = field(
        default_factory=lambda: FrozenMap({"normalise": "zscore"})
    )
    local_epochs: int
    batch_size: int
    optimiser: Literal["sgd", "adam"]
    learning_rate: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    rounds: int
    quorum: int
    min_sites: int = 0  # 0 means "= quorum"; resolved in __post_init__, so never 0 after
    round_deadline_s: float
    seed: int
    aggregation: str = "fedavg"  # one of shared.aggregation.AGGREGATIONS
    aggregation_params: Mapping[str, PreprocessValue] = field(default_factory=FrozenMap)
    weighting: Literal["samples", "uniform"] = "samples"
    max_update_norm: float | None = None
    dp: ClientDP | ExampleDP | None = None
    secure_aggregation: bool = False
    homomorphic: bool = False
    compression: str = "none"  # a codec name, see shared.compression.get_codec

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        _check_str("name", self.name)
        _check_str("task", self.task, choices=TASKS)
        _check_str("label_column", self.label_column)
        _check_str("architecture", self.architecture)
        _check_str("architecture_version", self.architecture_version)
        _check_int("input_size", self.input_size, MIN_INPUT_SIZE, MAX_INPUT_SIZE)
        put("preprocessing", _frozen_map("preprocessing", self.preprocessing))
        _check_int("local_epochs", self.local_epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_str("optimiser", self.optimiser, choices=OPTIMISERS)
        lr = _float("learning_rate", self.learning_rate, "a finite number > 0")
        if lr <= 0:
            raise _invalid("learning_rate", "a finite number > 0", self.learning_rate)
        put("learning_rate", lr)
        momentum = _float("momentum", self.momentum, "a number in [0, 1)")
        if not 0 <= momentum < 1:
            raise _invalid("momentum", "a number in [0, 1)", self.momentum)
        put("momentum", momentum)
        decay = _float("weight_decay", self.weight_decay, "a finite number >= 0")
        if decay < 0:
            raise _invalid("weight_decay", "a finite number >= 0", self.weight_decay)
        put("weight_decay", decay)
        _check_int("rounds", self.rounds, 1)
        _check_int("quorum", self.quorum, 1)
        if isinstance(self.min_sites, int) and not isinstance(self.min_sites, bool):
            if self.min_sites == 0:
                put("min_sites", self.quorum)
            elif self.min_sites < self.quorum:
                allowed = f"an integer >= quorum ({self.quorum}), or 0 for the quorum"
                raise _invalid("min_sites", allowed, self.min_sites)
        else:
            raise _invalid("min_sites", "an integer >= quorum, or 0 for the quorum", self.min_sites)
        deadline = _float("round_deadline_s", self.round_deadline_s, "a finite number > 0")
        if deadline <= 0:
            raise _invalid("round_deadline_s", "a finite number > 0", self.round_deadline_s)
        put("round_deadline_s", deadline)
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_str("aggregation", self.aggregation, choices=AGGREGATIONS)
        _check_str("weighting", self.weighting, choices=WEIGHTINGS)
        put("aggregation_params", _frozen_map("aggregation_params", self.aggregation_params))
        strategy = make_strategy(
            self.aggregation, dict(self.aggregation_params), weighting=self.weighting
        )
        if not isinstance(self.secure_aggregation, bool):
            raise _invalid("secure_aggregation", "true or false", self.secure_aggregation)
        if not isinstance(self.homomorphic, bool):
            raise _invalid("homomorphic", "true or false", self.homomorphic)
        codec = _codec(self.compression)
        put("compression", codec.name)
        # The reasons why a combination can never work come first: they are more use than
        # "not available yet".
        validate_strategy(
            strategy,
            secure_aggregation=self.secure_aggregation,
            compression=None if codec.name == "none" else codec.name,
            norm_layers=True,  # FedBN's need for them is checked with the architecture, last
            min_updates=self.quorum,
        )
        validate_compression(codec, secure_aggregation=self.secure_aggregation)
        if self.max_update_norm is not None:
            allowed = "null or a finite number > 0"
            norm = _float("max_update_norm", self.max_update_norm, allowed)
            if norm <= 0:
                raise _invalid("max_update_norm", allowed, self.max_update_norm)
            put("max_update_norm", norm)
        if self.dp is not None:
            put("dp", _client_dp(self.dp))
            self._check_dp()
        if self.secure_aggregation:
            self._check_secure_aggregation(codec)
        if self.homomorphic:
            self._check_homomorphic(codec)
        # Last: the registry's error lists what this installation can build.
        spec = get_architecture(self.architecture, self.architecture_version)
        params = _frozen_map("architecture_params", self.architecture_params)
        put(
            "architecture_params",
            FrozenMap(resolve_hyperparameters(spec, params, input_size=self.input_size)),
        )
        if self.aggregation == "fedbn":
            validate_strategy(
                strategy,
                secure_aggregation=self.secure_aggregation,
                compression=None,
                norm_layers=_local_layer_names(self),
            )
        if isinstance(self.dp, ExampleDP):
            self._check_example_dp()
        if self.homomorphic:
            layers = _batch_norm_layers(self)
            if layers:
                raise PlanError(
                    f"Homomorphic encryption cannot average {self.architecture} "
                    f"v{self.architecture_version}: its BatchNorm layers ({layers[0]}"
                    f"{', ...' if len(layers) > 1 else ''}) keep integer counters, and CKKS "
                    "adds real numbers only. Choose an architecture without BatchNorm, such "
                    "as small_cnn_gn (GroupNorm) or mlp.",
                    code="plan.invalid",
                    field="architecture",
                )

    @property
    def codec(self) -> Codec:
        """The update codec ``compression`` names (sites encode, the coordinator decodes)."""
        return get_codec(self.compression)

    def _check_dp(self) -> None:
        """Refuse what client-level DP cannot be combined with, saying why."""
        if isinstance(self.dp, ExampleDP):
            return  # checked last, with the architecture (_check_example_dp)
        if self.weighting != "uniform":
            raise PlanError(
                'Differential privacy needs equal weighting (weighting: "uniform"): weighting '
                "by sample count uses each hospital's number of images, which the noise does "
                "not protect, and would let a large hospital's update outweigh its noise once "
                'updates are summed securely. Set weighting to "uniform".',
                code="plan.invalid",
                field="weighting",
            )
        if self.max_update_norm is not None:
            raise PlanError(
                "max_update_norm cannot be combined with differential privacy: dp.clip_norm "
                "already bounds each site's update, and the coordinator would measure the "
                "noise too (about noise_multiplier x clip_norm x the square root of the "
                "number of parameters) and refuse honest updates. Set max_update_norm to null.",
                code="plan.invalid",
                field="max_update_norm",
            )

    def _check_secure_aggregation(self, codec: Codec) -> None:
        """Refuse what secure aggregation (``shared.privacy.secagg``) cannot work with."""

        def refuse(field: str, why: str) -> PlanError:
            return PlanError(why, code="plan.invalid", field=field)

        if codec.name != "none":
            raise refuse(
                "compression",
                f"Compression {codec.name!r} cannot be combined with secure aggregation: each "
                "update is quantised to integers and masked, which compression would break. "
                "Set compression to 'none'.",
            )
        if self.min_sites < 3:
            raise refuse(
                "min_sites",
                "Secure aggregation needs at least 3 sites per round (min_sites >= 3): a "
                "majority of the sites must survive to remove the masks, and with 2 sites the "
                "sum would reveal the other site's update to each. Raise min_sites to 3.",
            )
        if self.weighting != "uniform":
            raise refuse(
                "weighting",
                'Secure aggregation needs equal weighting (weighting: "uniform"): the '
                "coordinator only sees the sum, so it cannot weight each site's update by its "
                'sample count. Set weighting to "uniform".',
            )
        if self.secagg_clip_norm is None:
            raise refuse(
                "max_update_norm",
                "Secure aggregation needs a bound on each update's size, to quantise it "
                "without overflow: set max_update_norm (or a client-level dp block, whose "
                "clip_norm is used).",
            )

    def _check_homomorphic(self, codec: Codec) -> None:
        """Refuse what homomorphic-encryption rounds (``shared.privacy.he_rounds``) cannot
        work with, saying why."""

        def refuse(field: str, why: str) -> PlanError:
            return PlanError(why, code="plan.invalid", field=field)

        if self.secure_aggregation:
            raise refuse(
                "secure_aggregation",
                "Choose secure aggregation or homomorphic encryption, not both: each already "
                "keeps every site's update from the coordinator.",
            )
        if self.aggregation not in ("fedavg", "fedprox"):
            raise refuse(
                "aggregation",
                f"Homomorphic encryption cannot run {self.aggregation!r}: the coordinator can "
                "only add encrypted models with plain weights, so a median, a server "
                "optimiser or layers kept at each site are out of reach. Choose fedavg or "
                "fedprox.",
            )
        if codec.name != "none":
            raise refuse(
                "compression",
                f"Compression {codec.name!r} cannot be combined with homomorphic encryption: "
                "the coordinator adds ciphertexts, not compressed updates. Set compression "
                "to 'none'.",
            )
        if self.max_update_norm is not None:
            raise refuse(
                "max_update_norm",
                "max_update_norm cannot be checked under homomorphic encryption: the "
                "coordinator cannot measure an encrypted model. Set it to null (a "
                "client-level dp block bounds each update at its site).",
            )
        if self.min_sites < 2:
            raise refuse(
                "min_sites",
                "Homomorphic encryption needs at least 2 sites per round (min_sites >= 2): "
                "the key is shared between sites, and with one site the average would be "
                "its own model. Raise min_sites to 2.",
            )

    @property
    def secagg_clip_norm(self) -> float | None:
        """The L2 bound each site clips its update to before masking: ``dp.clip_norm`` with
        client-level DP, else ``max_update_norm``."""
        if isinstance(self.dp, ClientDP):
            return self.dp.clip_norm
        return self.max_update_norm

    def _check_example_dp(self) -> None:
        """Refuse what DP-SGD cannot train, saying why."""
        if local_training_options(
            make_strategy(self.aggregation, dict(self.aggregation_params), weighting=self.weighting)
        ):
            raise PlanError(
                f"Example-level differential privacy cannot be combined with "
                f"{self.aggregation!r}: its proximal term adds a gradient that is not clipped "
                "per example, so the noise would not cover it. Choose fedavg or a server "
                "optimiser.",
                code="plan.invalid",
                field="aggregation",
            )
        layers = _batch_norm_layers(self)
        if layers:
            raise PlanError(
                f"Example-level differential privacy cannot train {self.architecture} "
                f"v{self.architecture_version}: its BatchNorm layers ({', '.join(layers[:3])}"
                f"{', ...' if len(layers) > 3 else ''}) mix the images of a batch, so one "
                "image's gradient cannot be clipped on its own. Choose an architecture without "
                "BatchNorm, such as small_cnn_gn (GroupNorm) or mlp.",
                code="plan.invalid",
                field="architecture",
            )

    @property
    def epsilon(self) -> float | None:
        """The epsilon the whole run costs each site (at ``dp.delta``) under client-level DP;
        ``None`` without DP, and for example-level DP, whose epsilon depends on the site's
        number of images (``site_client.core.governance_view.plan_privacy`` computes it)."""
        if not isinstance(self.dp, ClientDP):
            return None
        return run_epsilon(self.dp, self.rounds)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingPlan:
        """Build from parsed JSON; unknown or missing keys and wrong types raise PlanError."""
        if not isinstance(data, Mapping):
            raise PlanError(
                f"A plan must be a JSON object, got {type(data).__name__}.", code="plan.invalid"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields), key=str)
        if unknown:
            raise PlanError(
                f"Unknown plan field(s) {', '.join(map(repr, unknown))}. Allowed fields: "
                f"{', '.join(sorted(fields))}.",
                code="plan.invalid",
            )
        missing = sorted(
            name
            for name, f in fields.items()
            if name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise PlanError(
                f"Plan is missing required field(s) {', '.join(map(repr, missing))}.",
                code="plan.invalid",
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with every field, defaults resolved (``dp`` and
        ``secure_aggregation`` only when set)."""
        result = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        result["preprocessing"] = dict(self.preprocessing)
        result["architecture_params"] = dict(self.architecture_params)
        result["aggregation_params"] = dict(self.aggregation_params)
        # Left out at their defaults so that plans written before them keep their hashes.
        if self.dp is None:
            del result["dp"]
        else:
            result["dp"] = self.dp.to_dict()
        if not self.secure_aggregation:
            del result["secure_aggregation"]
        if not self.homomorphic:
            del result["homomorphic"]
        if self.compression == "none":
            del result["compression"]
        return result

    def canonical_json(self) -> bytes:
        return canonical_json(self.to_dict())

    @property
    def plan_hash(self) -> PlanHash:
        """Hex SHA-256 of the canonical JSON: the plan's identity, which sites approve."""
        return PlanHash(sha256_hex(self.canonical_json()))


def _frozen_map(name: str, value: Any) -> FrozenMap:
    allowed = "an object mapping names to strings, numbers, booleans or null"
    if not isinstance(value, Mapping):
        raise _invalid(name, allowed, value)
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise _invalid(name, allowed, value)
        if isinstance(item, float) and not math.isfinite(item):
            raise _invalid(name, allowed, value)
        if item is not None and not isinstance(item, str | int | float | bool):
            raise _invalid(name, allowed, value)
    return value if isinstance(value, FrozenMap) else FrozenMap(value)


def _codec(value: Any) -> Codec:
    try:
        return get_codec(value)
    except PlanError as exc:
        raise PlanError(
            f"Plan field 'compression' is invalid: {exc.message}",
            code="plan.invalid",
            field="compression",
        ) from exc


def _local_layer_names(plan: TrainingPlan) -> frozenset[str]:
    """The entries FedBN keeps at the sites for ``plan``'s model (``fedbn.local_keys`` over
    its floating-point state: what travels, by name, as the coordinator sees it). The model
    is built on torch's ``meta`` device: shapes only, no memory, no weights drawn."""
    import torch

    spec = get_architecture(plan.architecture, plan.architecture_version)
    with torch.device("meta"):
        model = spec.builder(1, 1, plan.input_size, dict(plan.architecture_params))  # type: ignore[arg-type]
    names = [n for n, t in model.state_dict().items() if t.is_floating_point()]
    return local_keys(names)


def _batch_norm_layers(plan: TrainingPlan) -> list[str]:
    """The names of ``plan``'s model's batch-normalisation layers (built on torch's ``meta``
    device: shapes only, no memory, no weights drawn)."""
    import torch
    from torch import nn

    spec = get_architecture(plan.architecture, plan.architecture_version)
    with torch.device("meta"):
        model = spec.builder(1, 1, plan.input_size, dict(plan.architecture_params))  # type: ignore[arg-type]
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _client_dp(value: Any) -> ClientDP | ExampleDP:
    if isinstance(value, ClientDP | ExampleDP):
        return value
    try:
        if isinstance(value, Mapping) and "level" in value:
            return ExampleDP.from_dict(value)
        return ClientDP.from_dict(value)
    except PrivacyParameterError as exc:
        raise PlanError(
            f"Plan field 'dp' is invalid: {exc.message} Correct it in the plan.",
            code="plan.invalid",
            field="dp",
        ) from exc


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def load_plan(path: str | os.PathLike[str]) -> TrainingPlan:
    """Read and validate a plan from a JSON file."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise PlanError(
            f"Cannot read plan file {os.fspath(path)!r} ({exc.strerror or exc}). "
            "Check the path and its permissions.",
            code="plan.unreadable",
        ) from exc
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise PlanError(
            f"Plan file {os.fspath(path)!r} is not valid UTF-8 JSON ({exc}). Fix the file.",
            code="plan.invalid",
        ) from exc
    return TrainingPlan.from_dict(data)


def demo_plan(rounds: int = 5, **overrides: Any) -> TrainingPlan:
    """A plan for the demo: small_cnn on 64x64 images, 3 sites invited, 2 needed per round,
    FedAvg over 5 local epochs of Adam (lr 2e-3) per round. Calibrated on the synthetic
    federation (``shared.synthetic``): more local epochs per round favour the federation over
    sites training alone, whose small data sets saturate. ``overrides`` replace any field."""
    settings: dict[str, Any] = {
        "name": "demo-binary-small-cnn",
        "task": "binary_classification",
        "label_column": "label",
        "architecture": "small_cnn",
        "architecture_version": "1",
        "architecture_params": {},
        "input_size": 64,
        "preprocessing": {"normalise": "zscore"},
        "local_epochs": 5,
        "batch_size": 32,
        "optimiser": "adam",
        "learning_rate": 2e-3,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "rounds": rounds,
        "quorum": 2,
        "min_sites": 3,
        "round_deadline_s": 600.0,
        "seed": 0,
        "aggregation": "fedavg",
        "aggregation_params": {},
        "weighting": "samples",
        "max_update_norm": None,
    }
    settings.update(overrides)
    return TrainingPlan.from_dict(settings)
