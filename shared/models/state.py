"""A model's weights as a flat dict of float32 numpy arrays: the unit that sites and the
coordinator exchange, aggregate and hash.

Every floating-point state_dict entry travels, parameters and float buffers alike (BatchNorm
running statistics are averaged like weights, as in FedAvg, McMahan et al. 2017). Integer
buffers (``num_batches_tracked``) stay local: they count a site's own steps and carry no
information the global model needs.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from shared.errors import UpdateError


def model_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """Copies of every floating-point state_dict entry as contiguous float32 arrays, in
    state_dict order. Copies, so later training does not change them under the caller."""
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            arrays[name] = (
                tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().copy()
            )
    return arrays


def _describe(names: set[str], limit: int = 5) -> str:
    shown = sorted(names)[:limit]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def load_model_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` into ``model``'s floating-point state, all or nothing.

    Strict: the names must be exactly those ``model_arrays`` gives for this model and every
    shape must match; anything else is an update built for another architecture.
    """
    targets = {
        name: tensor
        for name, tensor in model.state_dict(keep_vars=True).items()
        if tensor.is_floating_point()
    }
    missing = set(targets) - set(arrays)
    unexpected = set(arrays) - set(targets)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected {_describe(unexpected)}")
        raise UpdateError(
            f"Weights do not match the model's parameters ({'; '.join(parts)}). "
            "They were made for another architecture or version; do not use them.",
            code="update.keys",
        )
    converted: dict[str, torch.Tensor] = {}
    for name, target in targets.items():
        array = np.asarray(arrays[name])
        if tuple(array.shape) != tuple(target.shape):
            raise UpdateError(
                f"Weight {name!r} has shape {tuple(array.shape)}, the model needs "
                f"{tuple(target.shape)}. The update was made for another architecture.",
                code="update.shape",
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise UpdateError(
                f"Weight {name!r} has dtype {array.dtype}, expected a floating-point type.",
                code="update.dtype",
            )
        converted[name] = _as_tensor(np.ascontiguousarray(array, dtype=np.float32))
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(converted[name])


def array_layout(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype name), e.g. ``{"head.bias": ((1,), "float32")}``: what two
    parties compare before they add their arrays."""
    return {name: (tuple(int(d) for d in a.shape), str(a.dtype)) for name, a in arrays.items()}


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over ``array``'s memory, only ever read (copied into the model). Weights
    decoded from a read-only mapping (a site's model file) are read-only arrays, for which
    ``torch.from_numpy`` warns that writing would be undefined; nothing writes here."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
