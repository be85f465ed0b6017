"""Registry of model architectures, addressed by (name, version).

A training plan names an architecture and a version; a site trains only architectures that ship
with its installed Tessera (plans carry no code, DESIGN.md "Governance"). A version is frozen
once released: changing a builder's layers or initialisation means a new version, because
replays must rebuild the same initial weights bit for bit from the plan's seed.

Some architectures take integer settings that the plan chooses (``architecture_params``, e.g.
the MLP's ``width``): they are declared here with their ranges, checked before anything is
built, and part of the plan's hash like every other field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shared.errors import PlanError

Builder = Callable[[int, int, int, Mapping[str, int]], nn.Module]
"""``builder(in_channels, num_classes, input_size, hyperparameters) -> nn.Module`` (weights
from torch's RNG; ``hyperparameters`` already checked and completed with their defaults)."""

ParameterCount = Callable[[int, int, int, Mapping[str, int]], int]

MAX_PARAMETERS = 2**27
"""Largest model a plan may ask for (134M float32 parameters, 512 MiB per model and per
update): a plan is data from the coordinator, and a site must not be made to allocate without
bound before it can refuse."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HyperParameter:
    """An integer setting of an architecture that a plan may choose in ``architecture_params``
    (plans carry no code, only registry names and such numbers)."""

    default: int
    low: int
    high: int
    description: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ArchitectureSpec:
    """One released architecture. ``builder`` draws its initial weights from torch's CPU RNG;
    ``build_model`` seeds that RNG inside a fork so the caller's RNG is left alone.
    ``hyperparameters`` are the settings a plan may choose; ``parameter_count``, when given,
    sizes the model from them without building it, so an oversized plan is refused early."""

    name: str
    version: str
    description: str
    builder: Builder
    min_input_size: int = 32
    hyperparameters: Mapping[str, HyperParameter] = field(default_factory=dict)
    parameter_count: ParameterCount | None = None


def _conv_block(in_channels: int, out_channels: int, *, groups: int = 0) -> nn.Sequential:
    """``groups`` > 0: GroupNorm with that many groups instead of BatchNorm, and a ReLU that
    is not in place (Opacus's per-example gradient hooks forbid modifying their outputs)."""
    norm = nn.GroupNorm(groups, out_channels) if groups else nn.BatchNorm2d(out_channels)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        norm,
        nn.ReLU(inplace=not groups),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """Four conv blocks (16-32-64-64 channels, BatchNorm, ReLU, 2x2 max-pool), global average
    pool, linear head: about 60k parameters, so a round of local training takes seconds on a
    hospital's CPU. Global pooling makes it accept any input size of at least 32 (4 halvings
    leave at least 2x2)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 1, *, groups: int = 0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, 16, groups=groups),
            _conv_block(16, 32, groups=groups),
            _conv_block(32, 64, groups=groups),
            _conv_block(64, 64, groups=groups),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class MLP(nn.Module):
    """Flatten, one hidden layer of ``width`` ReLU units, a linear head. Not an imaging model:
    the architecture whose size a plan sets exactly (``width``), so that benchmarks of the
    framework's own per-round cost (``benchmarks/round_overhead.py``) can move a model of any
    size with one cheap training step. Parameters: ``width * (C*S*S + 1 + classes) + classes``
    for C channels of S x S pixels."""

    def __init__(self, in_features: int, width: int, num_classes: int = 1) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(torch.flatten(x, 1))))


def _small_cnn_v1(
    in_channels: int, num_classes: int, input_size: int, params: Mapping[str, int]
) -> nn.Module:
    del input_size, params  # global pooling: the layers do not depend on the input size
    return SmallCNN(in_channels, num_classes)


def _small_cnn_gn_v1(
    in_channels: int, num_classes: int, input_size: int, params: Mapping[str, int]
) -> nn.Module:
    # GroupNorm normalises each image on its own, so per-example gradients exist (DP-SGD).
    del input_size, params
    return SmallCNN(in_channels, num_classes, groups=8)


def _densenet121_v1(
    in_channels: int, num_classes: int, input_size: int, params: Mapping[str, int]
) -> nn.Module:
    # Imported here: MONAI is heavy to import and only this architecture needs it.
    from monai.networks.nets import DenseNet121

    del input_size, params
    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes)


def _mlp_v1(
    in_channels: int, num_classes: int, input_size: int, params: Mapping[str, int]
) -> nn.Module:
    return MLP(in_channels * input_size * input_size, params["width"], num_classes)


def _mlp_v1_count(
    in_channels: int, num_classes: int, input_size: int, params: Mapping[str, int]
) -> int:
    width = params["width"]
    return width * (in_channels * input_size * input_size + 1 + num_classes) + num_classes


_REGISTRY: dict[tuple[str, str], ArchitectureSpec] = {
    (spec.name, spec.version): spec
    for spec in (
        ArchitectureSpec(
            name="small_cnn",
            version="1",
            description="Small 2D CNN (4 conv blocks, ~60k parameters) for fast CPU training",
            builder=_small_cnn_v1,
        ),
        ArchitectureSpec(
            name="small_cnn_gn",
            version="1",
            description="small_cnn with GroupNorm (8 groups) instead of BatchNorm: each image "
            "is normalised on its own, as example-level DP-SGD needs",
            builder=_small_cnn_gn_v1,
        ),
        ArchitectureSpec(
            name="densenet121",
            version="1",
            description="MONAI DenseNet121, 2D (Huang et al., CVPR 2017), ~7M parameters",
            builder=_densenet121_v1,
        ),
        ArchitectureSpec(
            name="mlp",
            version="1",
            description="One hidden layer of 'width' units on the flattened image; sized by the "
            "plan, for benchmarks of the framework's own overhead",
            builder=_mlp_v1,
            hyperparameters={
                "width": HyperParameter(
                    default=256, low=1, high=1 << 20, description="hidden units"
                )
            },
            parameter_count=_mlp_v1_count,
        ),
    )
}


def available_architectures() -> list[tuple[str, str]]:
    """Every (name, version) this installation can build, sorted."""
    return sorted(_REGISTRY)


def get_architecture(name: str, version: str) -> ArchitectureSpec:
    """The spec for (name, version); a plan naming anything else cannot run here."""
    spec = _REGISTRY.get((name, version))
    if spec is None:
        available = ", ".join(f"{n} v{v}" for n, v in available_architectures())
        raise PlanError(
            f"Unknown architecture {name!r} version {version!r}. This installation provides: "
            f"{available}. Choose one of these in the plan, or update Tessera at this site.",
            code="plan.unknown_architecture",
        )
    return spec


def resolve_hyperparameters(
    spec: ArchitectureSpec,
    params: Mapping[str, Any] | None,
    *,
    in_channels: int = 1,
    num_classes: int = 1,
    input_size: int = 64,
) -> dict[str, int]:
    """``params`` checked against ``spec`` (names, integers, ranges) and completed with the
    defaults; raises ``PlanError`` naming what to change. The model this describes must have
    at most ``MAX_PARAMETERS`` parameters."""
    given = dict(params or {})
    label = f"{spec.name} v{spec.version}"
    unknown = sorted(set(given) - set(spec.hyperparameters), key=str)
    if unknown:
        allowed = ", ".join(sorted(spec.hyperparameters)) or "none"
        raise PlanError(
            f"{label} has no setting {', '.join(map(repr, unknown))} (its settings: {allowed}). "
            "Remove it from the plan's architecture_params.",
            code="plan.invalid",
            field="architecture_params",
        )
    resolved: dict[str, int] = {}
    for key, hp in sorted(spec.hyperparameters.items()):
        value = given.get(key, hp.default)
        if not isinstance(value, int) or isinstance(value, bool) or not hp.low <= value <= hp.high:
            raise PlanError(
                f"{label} setting {key!r} ({hp.description}) must be an integer from {hp.low} "
                f"to {hp.high}; got {value!r}. Correct it in the plan's architecture_params.",
                code="plan.invalid",
                field="architecture_params",
            )
        resolved[key] = value
    if spec.parameter_count is not None:
        count = spec.parameter_count(in_channels, num_classes, input_size, resolved)
        if count > MAX_PARAMETERS:
            raise PlanError(
                f"{label} with {resolved} at input size {input_size} would have {count:,} "
                f"parameters, more than the {MAX_PARAMETERS:,} a site accepts. Choose smaller "
                "settings.",
                code="plan.invalid",
                field="architecture_params",
            )
    return resolved


def build_model(
    name: str,
    version: str,
    *,
    in_channels: int = 1,
    num_classes: int = 1,
    input_size: int = 64,
    params: Mapping[str, Any] | None = None,
    seed: int,
) -> nn.Module:
    """Build (name, version) with initial weights determined by ``seed`` alone.

    ``params`` are the plan's ``architecture_params`` (see ``resolve_hyperparameters``). The
    builder runs inside ``torch.random.fork_rng`` with the CPU generator seeded, so two calls
    with the same arguments give bit-identical weights and torch's global RNG is as it was.
    """
    spec = get_architecture(name, version)
    if input_size < spec.min_input_size:
        raise PlanError(
            f"{name} v{version} needs input_size >= {spec.min_input_size}, got {input_size}. "
            "Raise input_size in the plan.",
            code="plan.invalid",
        )
    if in_channels < 1 or num_classes < 1:
        raise PlanError(
            f"in_channels and num_classes must be >= 1, got {in_channels} and {num_classes}.",
            code="plan.invalid",
        )
    resolved = resolve_hyperparameters(
        spec, params, in_channels=in_channels, num_classes=num_classes, input_size=input_size
    )
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = spec.builder(in_channels, num_classes, input_size, resolved)
    return model
