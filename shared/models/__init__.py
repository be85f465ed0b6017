"""Model architectures (by name and version) and their weights as plain arrays."""

from shared.models.registry import (
    ArchitectureSpec,
    available_architectures,
    build_model,
    get_architecture,
)
from shared.models.state import array_layout, load_model_arrays, model_arrays

__all__ = [
    "ArchitectureSpec",
    "array_layout",
    "available_architectures",
    "build_model",
    "get_architecture",
    "load_model_arrays",
    "model_arrays",
]
