"""Registry of model architectures, addressed by (name, version).

A training plan names an architecture and a version; a site trains only architectures that ship
with its installed Tessera (plans carry no code, DESIGN.md "Governance"). A version is frozen
once released: changing a builder's layers or initialisation means a new version, because
replays must rebuild the same initial weights bit for bit from the plan's seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from shared.errors import PlanError

Builder = Callable[[int, int, int], nn.Module]
"""``builder(in_channels, num_classes, input_size) -> nn.Module`` (weights from torch's RNG)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ArchitectureSpec:
    """One released architecture. ``builder`` draws its initial weights from torch's CPU RNG;
    ``build_model`` seeds that RNG inside a fork so the caller's RNG is left alone."""

    name: str
    version: str
    description: str
    builder: Builder
    min_input_size: int = 32


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """Four conv blocks (16-32-64-64 channels, BatchNorm, ReLU, 2x2 max-pool), global average
    pool, linear head: about 60k parameters, so a round of local training takes seconds on a
    hospital's CPU. Global pooling makes it accept any input size of at least 32 (4 halvings
    leave at least 2x2)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, 16),
            _conv_block(16, 32),
            _conv_block(32, 64),
            _conv_block(64, 64),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def _small_cnn_v1(in_channels: int, num_classes: int, input_size: int) -> nn.Module:
    del input_size  # global pooling: the layers do not depend on it
    return SmallCNN(in_channels, num_classes)


def _densenet121_v1(in_channels: int, num_classes: int, input_size: int) -> nn.Module:
    # Imported here: MONAI is heavy to import and only this architecture needs it.
    from monai.networks.nets import DenseNet121

    del input_size
    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes)


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
            name="densenet121",
            version="1",
            description="MONAI DenseNet121, 2D (Huang et al., CVPR 2017), ~7M parameters",
            builder=_densenet121_v1,
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


def build_model(
    name: str,
    version: str,
    *,
    in_channels: int = 1,
    num_classes: int = 1,
    input_size: int = 64,
    seed: int,
) -> nn.Module:
    """Build (name, version) with initial weights determined by ``seed`` alone.

    The builder runs inside ``torch.random.fork_rng`` with the CPU generator seeded, so two calls
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
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = spec.builder(in_channels, num_classes, input_size)
    return model
