"""Top-k sparsification with error feedback kept at the site.

Sparsified SGD with memory (Stich, Cordonnier and Jaggi, "Sparsified SGD with Memory",
NeurIPS 2018) and Deep Gradient Compression (Lin, Han, Mao, Wang and Dally, ICLR 2018): send only
the largest-magnitude entries of an update and keep the rest at the site, adding it to the next
update before compressing ("error feedback"; Karimireddy et al., ICML 2019, show the same memory
repairs any biased compressor, e.g. int8 rounding). Over rounds nothing is lost, only delayed:
``sum(sent) + residual == sum(updates)``.

Selection is **per tensor** (as DGC's layer-wise thresholds): tensor ``t`` with ``n`` elements
keeps ``k = min(n, max(1, ceil(fraction * n)))`` entries. Why not one global top-k: the payload
size is then fixed by the layout alone (the coordinator can bound it before reading), indices
stay 32-bit within a tensor, and small tensors whose updates are small in magnitude (biases,
normalisation layers) are not starved for many rounds. Ties at the threshold are broken by the
lower index, so the choice is a function of the values alone (reproducible payloads).

Payload (a safetensors file tagged ``topk:<fraction>`` or ``topk:<fraction>+int8``):
``indices/t`` U32 (k), strictly increasing; ``values/t`` F32 (k) or I8 (k) with ``scales/t`` F32,
int8 quantised per block of 256 kept values as in :mod:`shared.compression.codecs`.

:class:`ErrorFeedback` keeps the residual, one float32 tensor per model tensor, and serialises it
with safetensors so a site that restarts resumes where it stopped. It works with every codec: the
residual is ``(update + residual) - decode(encode(update + residual))``, computed from the very
bytes that were sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from shared.aggregation.validation import TensorLayout, check_keys, check_tensor_meta
from shared.compression.codecs import (
    DEFAULT_BLOCK,
    Buffer,
    Codec,
    as_float32,
    check_entries,
    check_finite,
    check_int8,
    dequantise_int8,
    header_bound,
    malformed,
    normalise_layout,
    pack,
    quantise_int8,
    unpack,
)
from shared.errors import PlanError, UpdateError
from shared.tensors import decode_tensors, encode_tensors


def keep_count(n: int, fraction: float) -> int:
    """Entries kept of a tensor of ``n`` elements: ``min(n, max(1, ceil(fraction * n)))``."""
    return 0 if n == 0 else min(n, max(1, math.ceil(fraction * n)))


def top_indices(flat: np.ndarray, k: int) -> np.ndarray:
    """Sorted uint32 indices of the ``k`` largest ``|flat|``; ties go to the lower index."""
    n = flat.size
    if k >= n:
        return np.arange(n, dtype=np.uint32)
    if k == 0:
        return np.zeros(0, np.uint32)
    mag = np.abs(flat)
    threshold = np.partition(mag, n - k)[n - k]
    above = np.flatnonzero(mag > threshold)
    ties = np.flatnonzero(mag == threshold)[: k - above.size]
    return np.sort(np.concatenate([above, ties])).astype(np.uint32)


def _fraction_text(fraction: float) -> str:
    return repr(float(fraction))


@dataclass(frozen=True, slots=True)
class TopK(Codec):
    """Keep ``fraction`` of each tensor's entries (largest magnitude); values F32 or int8."""

    fraction: float
    int8_values: bool = False
    block: int = field(default=DEFAULT_BLOCK, repr=False)

    def __post_init__(self) -> None:
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f <= 1:
            raise PlanError(
                f"top-k fraction must be a number in (0, 1], got {f!r}; e.g. 'topk:0.01' "
                "sends 1 % of the entries.",
                code="plan.invalid",
            )
        object.__setattr__(self, "fraction", float(f))

    @property
    def name(self) -> str:
        return f"topk:{_fraction_text(self.fraction)}" + ("+int8" if self.int8_values else "")

    def encode(self, update: Mapping[str, np.ndarray]) -> bytes:
        out: dict[str, np.ndarray] = {}
        for name, a in as_float32(update).items():
            flat = a.reshape(-1)
            idx = top_indices(flat, keep_count(flat.size, self.fraction))
            values = flat[idx]
            out[f"indices/{name}"] = idx
            if self.int8_values:
                q, scales = quantise_int8(values, self.block)
                out[f"values/{name}"] = q
                out[f"scales/{name}"] = scales
            else:
                out[f"values/{name}"] = values
        return pack(out, self.name)

    def _parts(self) -> tuple[str, ...]:
        return ("indices", "values", "scales") if self.int8_values else ("indices", "values")

    def decode(self, data: Buffer, layout: TensorLayout) -> dict[str, np.ndarray]:
        lay = normalise_layout(layout)
        arrays = unpack(data, self.name)
        check_entries(arrays, lay, self._parts())
        out: dict[str, np.ndarray] = {}
        for name, (shape, dt) in lay.items():
            n = math.prod(shape)
            k = keep_count(n, self.fraction)
            idx, values = arrays[f"indices/{name}"], arrays[f"values/{name}"]
            if idx.dtype != np.uint32 or idx.ndim != 1 or values.ndim != 1:
                raise malformed(f"indices of {name!r} are not a vector of uint32")
            if idx.shape != (k,) or values.shape != (k,):
                raise UpdateError(
                    f"Tensor {name!r} carries {idx.size} indices and {values.size} values, but "
                    f"the global model's is {shape}, of which {self.name} keeps {k}. Make the "
                    "update from this round's global model with this round's plan.",
                    code="update.shape",
                    tensor=name,
                )
            if k and (int(idx[-1]) >= n or (k > 1 and not np.all(idx[1:] > idx[:-1]))):
                raise malformed(f"indices of {name!r} are not increasing within the tensor")
            if self.int8_values:
                check_int8(name, values, arrays[f"scales/{name}"], k, self.block)
                kept = dequantise_int8(values, arrays[f"scales/{name}"], self.block)
            else:
                if values.dtype != np.float32:
                    raise malformed(f"values of {name!r} are not float32")
                check_finite(name, values)
                kept = values
            dense = np.zeros(n, dt)
            dense[idx] = kept
            out[name] = dense.reshape(shape)
        return out

    def max_payload_size(self, layout: TensorLayout) -> int:
        lay = normalise_layout(layout)
        data = 0
        for s, _ in lay.values():
            k = keep_count(math.prod(s), self.fraction)
            data += 4 * k + (k + 4 * -(-k // self.block) if self.int8_values else 4 * k)
        keys = {f"{p}/{n}": 1 for n in lay for p in self._parts()}
        return data + header_bound(keys)


def feedback_step(
    update: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray],
    codec: Codec,
    layout: TensorLayout,
) -> tuple[bytes, dict[str, np.ndarray]]:
    """One round of error feedback, pure: ``(payload, new_residual)``.

    ``corrected = update + residual``; the payload is ``codec.encode(corrected)`` and the new
    residual ``corrected - codec.decode(payload)``, what the coordinator will not see.
    """
    lay = normalise_layout(layout)
    check_keys(update.keys(), layout)
    check_keys(residual.keys(), layout)
    corrected: dict[str, np.ndarray] = {}
    for name, a in as_float32(update).items():
        check_tensor_meta(name, a.shape, "float32", {name: (lay[name][0], "float32")})
        corrected[name] = a + residual[name]
    payload = codec.encode(corrected)
    sent = codec.decode(payload, layout)
    new_residual = {n: (corrected[n] - sent[n].astype(np.float32)) for n in lay}
    return payload, new_residual


class ErrorFeedback:
    """The site's residual for one run and codec; persist it with :meth:`to_bytes`.

    Reset it (a fresh instance) when the plan's codec or model changes. Not thread-safe.
    """

    def __init__(self, layout: TensorLayout, residual: Mapping[str, np.ndarray] | None = None):
        self._layout = normalise_layout(layout)
        self._f32_layout = {n: (s, "float32") for n, (s, _) in self._layout.items()}
        if residual is None:
            residual = {n: np.zeros(s, np.float32) for n, (s, _) in self._layout.items()}
        self._residual = self._checked(residual)

    def _checked(self, residual: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_keys(residual.keys(), self._f32_layout)
        out: dict[str, np.ndarray] = {}
        for name, (shape, _) in self._layout.items():
            a = residual[name]
            if not isinstance(a, np.ndarray):
                raise UpdateError(f"Residual {name!r} is not an array.", code="update.dtype")
            check_tensor_meta(name, a.shape, str(a.dtype), {name: (shape, "float32")})
            check_finite(name, a.reshape(-1))
            out[name] = a
        return out

    @property
    def residual(self) -> dict[str, np.ndarray]:
        return {n: a.copy() for n, a in self._residual.items()}

    def compress(self, update: Mapping[str, np.ndarray], codec: Codec) -> bytes:
        """Payload for ``update`` plus the residual; the residual becomes what was not sent."""
        payload, self._residual = feedback_step(update, self._residual, codec, self._f32_layout)
        return payload

    def to_bytes(self) -> bytes:
        """The residual as safetensors bytes (store it in the site's database or a file)."""
        return encode_tensors(self._residual)

    @classmethod
    def from_bytes(cls, data: Buffer, layout: TensorLayout) -> ErrorFeedback:
        """Restore a residual saved by :meth:`to_bytes`; raises only ``UpdateError``."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise malformed(f"expected bytes, got {type(data).__name__}")
        return cls(layout, decode_tensors(data))
