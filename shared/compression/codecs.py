"""Update codecs: float32 updates <-> compact, self-describing safetensors payloads.

Theory of operation
-------------------
A codec is a pair of pure functions, ``encode(update) -> bytes`` at the site and
``decode(data, layout) -> update`` at the coordinator (or the reverse for downloads of the global
model). Every payload is a safetensors file (:mod:`shared.tensors`, never pickle) whose
``__metadata__`` holds one key, ``tessera.codec``, naming the codec that wrote it (``"fp16"``,
``"int8;block=256"``, ``"topk:0.01"``); the plain ``"none"`` codec writes no metadata, so its
payloads are exactly :func:`shared.tensors.encode_tensors`'s. Equal inputs give equal bytes
(sorted keys, deterministic rounding, single-threaded zstd), so a digest identifies a payload.

The decoder trusts nothing: :func:`shared.tensors.decode_tensors` checks the container, then the
codec checks its tag, the entry names against the layout, every shape and dtype, and every value,
and only then builds the update. Any input raises :class:`~shared.errors.UpdateError` and no other
exception (hypothesis tests feed random and mutated bytes). Codes:

- ``update.malformed``  not a payload of this format (container, auxiliary entries, indices)
- ``update.codec``      a well-formed payload written by another codec than the plan's
- ``update.keys``       tensor names differ from the global model's
- ``update.shape``      a tensor's shape differs from the global model's
- ``update.dtype``      a tensor's values have another dtype than the codec writes
- ``update.nonfinite``  NaN or +-Inf in values or scales
- ``update.range``      fp16: a value beyond float16's range; int8: a scale so large that the
                        decoded values would overflow float32
- ``update.too_large``  zstd: the payload would decompress beyond the limit (a zip bomb)

Formats (``n`` = a tensor's element count, ``B`` = the int8 block):

==================  ==========================================================  ===============
codec               entries per tensor ``t``                                    bytes / element
==================  ==========================================================  ===============
``none``            ``t``: the layout's dtype                                   4
``fp16``            ``t``: F16                                                  2
``int8``            ``values/t``: I8, layout shape; ``scales/t``: F32 (ceil n/B)  1 + 4/B
``topk:f``          ``indices/t``: U32 (k), sorted; ``values/t``: F32 (k)        8 f
``topk:f+int8``     as ``topk:f`` with ``values/t``: I8 and ``scales/t``: F32    5 f
==================  ==========================================================  ===============

Prefixes make the entry names an injective function of the tensor names, so no model name can
collide with an auxiliary entry. ``+zstd`` wraps any of them in one zstd frame
(:class:`Compressed`).

Error bounds per element (``x`` sent, ``y`` decoded; both float32):

- fp16: round to nearest float16; ``|x - y| <= 2**-11 |x|`` for normal float16 values
  (``|x| >= 2**-14``) and ``<= 2**-25`` below. ``|x| > 65504`` (after rounding) raises
  ``update.range`` at encode time instead of sending Inf.
- int8: per block of ``B`` consecutive elements of a tensor (row-major), ``scale`` is
  ``max|x| / 127`` rounded *up* to float32, so ``|x| / scale <= 127`` and no value is clipped;
  ``q = round_half_even(x / scale)`` in ``[-127, 127]`` (symmetric: -128 is never written and is
  refused). ``|x - q scale| <= scale / 2``, plus the float32 rounding of the decoded product
  (``<= 2**-24 |y|``). Rounding is deterministic (no RNG), so a site's payload is reproducible;
  stochastic rounding (unbiased, as in QSGD, Alistarh et al. 2017) is not needed because error
  feedback (:mod:`shared.compression.topk`) already carries what rounding drops to the next round.
- top-k: kept entries are exact (F32) or int8 as above; the rest decode as 0 and stay at the site
  in the error-feedback residual.

Composition with secure aggregation (Bonawitz et al., CCS 2017) -- a rule for plan validation
-----------------------------------------------------------------------------------------------
Secure aggregation adds pairwise masks modulo ``2**k`` to integer vectors; the coordinator can
only sum them. Hence **quantise before masking**: the site first applies the codec's rounding,
then maps the result to fixed-point integers, then masks. Masked values are uniform in
``Z_{2**k}``, so nothing compresses after masking: the wire size is ``k`` bits per element,
chosen by the ring, not by these codecs. Concretely, plan validation must refuse, with a reason:

- ``topk:*`` with secure aggregation: masks make every coordinate non-zero (masked zeros are not
  sparse), each site keeps different indices so the pairwise masks would not cancel in a sparse
  sum, and the index sets themselves reveal which parameters a site moved most.
- ``int8`` (this codec, per-block scales from the data) with secure aggregation: the server would
  add integers quantised at different per-site scales, which is meaningless, and the scales are
  sent in clear. What composes is int8 with a *shared, plan-fixed* scale (``scale = max_abs/127``
  from the plan's clipping bound, the same for every site): ``q`` in ``[-127, 127]`` is masked in a
  ring with ``k >= 8 + ceil(log2(n_sites))`` bits so the sum cannot wrap; that variant is future
  work with the secure-aggregation issue.
- ``+zstd`` on masked uploads: useless (uniform bytes), refuse or ignore.
- ``fp16`` with secure aggregation is harmless but gives no saving; it only moves values to the
  float16 grid before the fixed-point mapping.

Downloads of the global model are not masked: any codec applies to them.
"""

from __future__ import annotations

import json
import math
import struct
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import safetensors.numpy
import zstandard

from shared.aggregation.validation import TensorLayout, check_keys, check_range
from shared.errors import PlanError, UpdateError
from shared.tensors import decode_tensors, encode_tensors

Buffer = bytes | bytearray | memoryview

TAG_KEY = "tessera.codec"
"""The ``__metadata__`` key that names the codec which wrote a payload."""

FP16_MAX = 65504.0
DEFAULT_BLOCK = 256
MAX_BLOCK = 1 << 16
_F32_MAX = float(np.finfo(np.float32).max)
_MAX_SCALE = _F32_MAX / 127  # 127 * scale stays finite in float32


# --- errors ---------------------------------------------------------------------------


def malformed(reason: str) -> UpdateError:
    return UpdateError(
        f"The compressed update is malformed ({reason}); it was rejected. If it came from a "
        "peer, the peer runs an incompatible or faulty version.",
        code="update.malformed",
    )


def _dtype_error(name: str, got: np.dtype[Any], want: str, codec: str) -> UpdateError:
    return UpdateError(
        f"Tensor {name!r} arrived as {got}, but codec {codec!r} sends {want}. The sender uses "
        "another codec version; update it.",
        code="update.dtype",
        tensor=name,
    )


def _shape_error(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> UpdateError:
    return UpdateError(
        f"Tensor {name!r} has shape {got}, but the global model's is {want}. Make the update "
        "from this round's global model.",
        code="update.shape",
        tensor=name,
    )


# --- layout and input helpers -----------------------------------------------------------


def normalise_layout(layout: TensorLayout) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
    """Layout with tuple shapes and numpy float dtypes; a non-float dtype is a plan error."""
    out: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}
    for name, (shape, dtype) in layout.items():
        dt = np.dtype(dtype)
        if dt.kind != "f":
            raise PlanError(
                f"Tensor {name!r} has dtype {dt}; update codecs carry floating-point tensors "
                "only. Use codec 'none' for this model.",
                code="plan.layout",
            )
        out[name] = (tuple(int(d) for d in shape), dt)
    return out


def check_finite(name: str, flat: np.ndarray) -> None:
    """Raise ``update.nonfinite`` unless every element of the 1-D float array is finite."""
    check_range(name, flat, float(np.finfo(flat.dtype).max))


def as_float32(update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The update's tensors as finite float32 arrays (what lossy codecs encode), checked."""
    out: dict[str, np.ndarray] = {}
    for name in sorted(update):
        a = update[name]
        if not isinstance(name, str) or not name:
            raise UpdateError(
                f"Tensor name {name!r} is not allowed; use a non-empty string.", code="update.keys"
            )
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
            kind = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise UpdateError(
                f"Tensor {name!r} is {kind}; codecs encode float arrays (float32) only.",
                code="update.dtype",
                tensor=name,
            )
        flat = a.reshape(-1)
        check_finite(name, flat)
        if a.dtype != np.float32:
            check_range(name, flat, _F32_MAX)
        out[name] = a.astype(np.float32, copy=False)
    return out


def header_bound(keys: Mapping[str, int]) -> int:
    """Upper bound of a safetensors header for entries ``key -> number of dims``."""
    per_key = sum(len(json.dumps(k)) + 96 + 21 * (ndim + 2) for k, ndim in keys.items())
    return 8 + 512 + per_key + 8


# --- payload container ------------------------------------------------------------------


def pack(arrays: Mapping[str, np.ndarray], tag: str | None) -> bytes:
    """Safetensors bytes with ``tessera.codec = tag`` (one metadata key: deterministic)."""
    if tag is None:
        return encode_tensors(arrays)
    # Not np.ascontiguousarray: it turns 0-d arrays into 1-d ones.
    prepared = {k: np.array(arrays[k], order="C", copy=None) for k in sorted(arrays)}
    return safetensors.numpy.save(prepared, metadata={TAG_KEY: tag})


def unpack(data: Buffer, tag: str | None) -> dict[str, np.ndarray]:
    """Validated container whose tag is ``tag`` (``None``: no metadata), else UpdateError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise malformed(f"expected bytes, got {type(data).__name__}")
    arrays = decode_tensors(data)  # raises only UpdateError("update.malformed")
    # decode_tensors accepted the header, so it is a JSON object of this length.
    view = memoryview(data).cast("B")
    (header_len,) = struct.unpack("<Q", view[:8])
    meta = json.loads(bytes(view[8 : 8 + header_len])).get("__metadata__")
    got = None if meta is None else meta.get(TAG_KEY)
    if meta is not None and set(meta) != {TAG_KEY}:
        raise malformed("unexpected metadata")
    if got != tag:
        raise UpdateError(
            f"The update was written by codec {got or 'none'!r}, but this round's plan uses "
            f"{tag or 'none'!r}. The site and the coordinator disagree on the plan; restart the "
            "site so it loads the current plan.",
            code="update.codec",
        )
    return arrays


def check_entries(
    arrays: Mapping[str, np.ndarray], layout: Mapping[str, Any], parts: tuple[str, ...]
) -> None:
    """Entry names must be ``part/name`` for every part and layout name (``()``: plain names)."""
    expected = set(layout) if not parts else {f"{p}/{n}" for n in layout for p in parts}
    got = set(arrays)
    if got == expected:
        return
    bases = set()
    for key in got:
        prefix, sep, base = key.partition("/")
        bases.add(base if parts and sep and prefix in parts else key)
    check_keys(bases, layout)  # raises update.keys when the tensor names differ
    missing = sorted(expected - got)[:3]
    raise malformed(f"entries {missing} are missing")


def check_shape(name: str, a: np.ndarray, shape: tuple[int, ...]) -> None:
    if a.shape != shape:
        raise _shape_error(name, a.shape, shape)


def check_dtype(name: str, a: np.ndarray, want: np.dtype[Any], codec: str) -> None:
    if a.dtype != want:
        raise _dtype_error(name, a.dtype, str(want), codec)


# --- int8 block quantisation (shared with top-k) ---------------------------------------


def quantise_int8(flat: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one float32 scale per ``block`` elements of a finite 1-D array.

    ``scale = max|x| / 127`` rounded up to float32 (so ``|x| <= 127 scale``, nothing clips),
    ``q = rint(x / scale)`` (round half to even) in float64; an all-zero block has scale 0.
    """
    n = flat.size
    blocks = -(-n // block)
    padded = np.zeros(blocks * block, np.float64)
    padded[:n] = flat
    rows = padded.reshape(blocks, block)
    peak = np.maximum(rows.max(axis=1, initial=0.0), -rows.min(axis=1, initial=0.0))
    exact = peak / 127.0
    scales = exact.astype(np.float32)
    low = scales.astype(np.float64) < exact
    scales[low] = np.nextafter(scales[low], np.float32(np.inf))
    divisor = np.where(scales > 0, scales, 1.0).astype(np.float64)
    q = np.rint(rows / divisor[:, None]).astype(np.int8).reshape(-1)[:n]
    return q, scales


def dequantise_int8(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """Inverse of :func:`quantise_int8` (float32 output; each product rounded once)."""
    n = q.size
    padded = np.zeros(scales.size * block, np.float32)
    padded[:n] = q
    return (padded.reshape(scales.size, block) * scales[:, None]).reshape(-1)[:n]


def check_int8(name: str, q: np.ndarray, scales: np.ndarray, n: int, block: int) -> None:
    """Validate decoded int8 values (1-D, ``n``) and their scales before dequantising."""
    if q.dtype != np.int8:
        raise _dtype_error(name, q.dtype, "int8", "int8")
    if scales.dtype != np.float32 or scales.shape != (-(-n // block),):
        raise malformed(f"scales of {name!r} have the wrong dtype or count")
    if q.size and int(q.min()) < -127:
        raise malformed(f"{name!r} holds -128, outside the symmetric int8 range")
    if scales.size:
        check_finite(name, scales)
        if float(scales.min()) < 0:
            raise malformed(f"{name!r} has a negative scale")
        if float(scales.max()) > _MAX_SCALE:
            raise UpdateError(
                f"Tensor {name!r} has an int8 scale so large that its values overflow float32. "
                "Clip the update to the plan's range before sending it.",
                code="update.range",
                tensor=name,
            )


# --- codecs -----------------------------------------------------------------------------


class Codec(ABC):
    """``encode(update) -> bytes`` and ``decode(data, layout) -> update``, both pure."""

    @property
    @abstractmethod
    def name(self) -> str:
        """The plan name; ``get_codec(codec.name)`` gives an equal codec."""

    @abstractmethod
    def encode(self, update: Mapping[str, np.ndarray]) -> bytes:
        """Payload for a finite float update (raises ``UpdateError`` for NaN, bad dtypes)."""

    @abstractmethod
    def decode(self, data: Buffer, layout: TensorLayout) -> dict[str, np.ndarray]:
        """The update in ``layout``'s shapes and dtypes; raises only ``UpdateError``."""

    @abstractmethod
    def max_payload_size(self, layout: TensorLayout) -> int:
        """Bytes no valid payload for ``layout`` exceeds (bounds decompression)."""


@dataclass(frozen=True, slots=True)
class NoCompression(Codec):
    """Float32 as is: exactly :func:`shared.tensors.encode_tensors`'s bytes, no metadata."""

    @property
    def name(self) -> str:
        return "none"

    def encode(self, update: Mapping[str, np.ndarray]) -> bytes:
        for name in update:
            a = update[name]
            if isinstance(a, np.ndarray) and a.dtype.kind == "f":
                check_finite(name, a.reshape(-1))
        return pack(update, None)

    def decode(self, data: Buffer, layout: TensorLayout) -> dict[str, np.ndarray]:
        lay = normalise_layout(layout)
        arrays = unpack(data, None)
        check_entries(arrays, lay, ())
        for name, (shape, dtype) in lay.items():
            check_shape(name, arrays[name], shape)
            check_dtype(name, arrays[name], dtype, self.name)
        for name in lay:
            check_finite(name, arrays[name].reshape(-1))
        return {name: arrays[name] for name in lay}

    def max_payload_size(self, layout: TensorLayout) -> int:
        lay = normalise_layout(layout)
        data = sum(math.prod(s) * dt.itemsize for s, dt in lay.values())
        return data + header_bound({n: len(s) for n, (s, _) in lay.items()})


@dataclass(frozen=True, slots=True)
class Fp16(Codec):
    """IEEE half precision, round to nearest; values beyond +-65504 are refused."""

    @property
    def name(self) -> str:
        return "fp16"

    def encode(self, update: Mapping[str, np.ndarray]) -> bytes:
        out: dict[str, np.ndarray] = {}
        for name, a in as_float32(update).items():
            with np.errstate(over="ignore"):  # overflow is reported below as update.range
                h = a.astype(np.float16)
            flat = h.reshape(-1)
            if flat.size and not (flat.max() <= FP16_MAX and flat.min() >= -FP16_MAX):
                raise UpdateError(
                    f"Tensor {name!r} has values beyond float16's range (+-{FP16_MAX:g}). Use "
                    "codec 'int8' or 'none' for this model, or clip the update.",
                    code="update.range",
                    tensor=name,
                )
            out[name] = h
        return pack(out, self.name)

    def decode(self, data: Buffer, layout: TensorLayout) -> dict[str, np.ndarray]:
        lay = normalise_layout(layout)
        arrays = unpack(data, self.name)
        check_entries(arrays, lay, ())
        for name, (shape, _) in lay.items():
            check_shape(name, arrays[name], shape)
            check_dtype(name, arrays[name], np.dtype(np.float16), self.name)
        for name in lay:
            check_finite(name, arrays[name].reshape(-1))
        return {name: arrays[name].astype(dt) for name, (_, dt) in lay.items()}

    def max_payload_size(self, layout: TensorLayout) -> int:
        lay = normalise_layout(layout)
        data = sum(2 * math.prod(s) for s, _ in lay.values())
        return data + header_bound({n: len(s) for n, (s, _) in lay.items()})


@dataclass(frozen=True, slots=True)
class Int8(Codec):
    """Symmetric int8 with one float32 scale per ``block`` elements (see the module docstring)."""

    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        if not (isinstance(self.block, int) and 1 <= self.block <= MAX_BLOCK):
            raise PlanError(
                f"int8 block size must be an integer in 1..{MAX_BLOCK}, got {self.block!r}.",
                code="plan.invalid",
            )

    @property
    def name(self) -> str:
        return "int8" if self.block == DEFAULT_BLOCK else f"int8;block={self.block}"

    @property
    def tag(self) -> str:
        return f"int8;block={self.block}"

    def encode(self, update: Mapping[str, np.ndarray]) -> bytes:
        out: dict[str, np.ndarray] = {}
        for name, a in as_float32(update).items():
            q, scales = quantise_int8(a.reshape(-1), self.block)
            out[f"values/{name}"] = q.reshape(a.shape)
            out[f"scales/{name}"] = scales
        return pack(out, self.tag)

    def decode(self, data: Buffer, layout: TensorLayout) -> dict[str, np.ndarray]:
        lay = normalise_layout(layout)
        arrays = unpack(data, self.tag)
        check_entries(arrays, lay, ("values", "scales"))
        for name, (shape, _) in lay.items():
            check_shape(name, arrays[f"values/{name}"], shape)
        out: dict[str, np.ndarray] = {}
        for name, (shape, dt) in lay.items():
            q = arrays[f"values/{name}"].reshape(-1)
            scales = arrays[f"scales/{name}"]
            check_int8(name, q, scales, q.size, self.block)
            out[name] = dequantise_int8(q, scales, self.block).reshape(shape).astype(dt)
        return out

    def max_payload_size(self, layout: TensorLayout) -> int:
        lay = normalise_layout(layout)
        data = sum(math.prod(s) + 4 * -(-math.prod(s) // self.block) for s, _ in lay.values())
        keys = {f"{p}/{n}": len(s) for n, (s, _) in lay.items() for p in ("values", "scales")}
        return data + header_bound(keys)


DEFAULT_LEVEL = 3


@dataclass(frozen=True, slots=True)
class Compressed(Codec):
    """``codec``'s payload in one zstd frame (content size and checksum written).

    Decoding reads the frame header first and refuses, with ``update.too_large``, a frame that
    declares (or would produce) more than ``max_output_size`` bytes; by default that is
    ``codec.max_payload_size(layout)``, the largest valid payload for the layout, so a zip bomb
    never allocates more than one honest payload. Frames without a content size are refused.
    """

    codec: Codec
    level: int = DEFAULT_LEVEL
    max_output_size: int | None = None

    _SUFFIX: ClassVar[str] = "+zstd"

    def __post_init__(self) -> None:
        if isinstance(self.codec, Compressed):
            raise PlanError("zstd cannot wrap zstd.", code="plan.invalid")
        if not (isinstance(self.level, int) and 1 <= self.level <= zstandard.MAX_COMPRESSION_LEVEL):
            raise PlanError(
                f"zstd level must be 1..{zstandard.MAX_COMPRESSION_LEVEL}, got {self.level!r}.",
                code="plan.invalid",
            )

    @property
    def name(self) -> str:
        return self.codec.name + self._SUFFIX

    def encode(self, update: Mapping[str, np.ndarray]) -> bytes:
        inner = self.codec.encode(update)
        compressor = zstandard.ZstdCompressor(
            level=self.level, write_content_size=True, write_checksum=True
        )
        return compressor.compress(inner)

    def decode(self, data: Buffer, layout: TensorLayout) -> dict[str, np.ndarray]:
        limit = self.max_output_size
        if limit is None:
            limit = self.codec.max_payload_size(layout)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise malformed(f"expected bytes, got {type(data).__name__}")
        try:
            params = zstandard.get_frame_parameters(data)
        except (zstandard.ZstdError, ValueError, TypeError) as exc:
            raise malformed("not a zstd frame") from exc
        size = params.content_size
        if size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
            raise malformed("the zstd frame does not declare its size")
        if size > limit:
            raise UpdateError(
                f"The compressed update would expand to {size} bytes, more than the {limit} "
                "bytes an update of this model can take. It was rejected.",
                code="update.too_large",
            )
        try:
            inner = zstandard.ZstdDecompressor().decompress(
                data, max_output_size=limit, allow_extra_data=False
            )
        except (zstandard.ZstdError, ValueError, MemoryError) as exc:
            raise malformed("the zstd frame is corrupt or truncated") from exc
        return self.codec.decode(inner, layout)

    def max_payload_size(self, layout: TensorLayout) -> int:
        inner = self.codec.max_payload_size(layout)
        return inner + inner // 128 + 1024  # zstd's worst case for incompressible input
