"""Weighted federated averaging (FedAvg) as a streaming, order-independent accumulator.

FedAvg (McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017) replaces the global model by the
average of the sites' models (here: of their updates) weighted by each site's number of
examples: ``mean = sum_k w_k x_k / sum_k w_k``.

Theory of operation
-------------------
DESIGN.md asks for two things at once: memory O(model) however many sites report, updates
folded in as their chunks arrive, and a result that does not depend on arrival order, bit for
bit. Floating-point sums are not associative, so a float accumulator fails the second. We use
a **fixed-point accumulator modulo 2**32** (one ``int32`` per parameter, wrapping on overflow):

    acc += trunc(x * e_k)    (mod 2**32)     e_k = float32(w_k * C)

Integer addition modulo 2**32 is exact, commutative and associative, so any arrival order gives
the same bits, and it is exactly reversible, so a stream that turns out bad (NaN in its last
chunk, norm beyond the bound, truncated) is removed by subtracting what it added. It is also
the arithmetic secure aggregation (Bonawitz et al., CCS 2017) uses, so masked updates can later
be folded into the same accumulator.

Why int32, and why truncation: per block the kernel runs a max and a min reduction (NaN/Inf
and range in one comparison each; plus one dot product for the norm, only when the accumulator
has a ``max_norm``), one multiply-and-convert and one add into the accumulator.
Measured on the 2-core dev machine (numpy, one thread, 1 GB of inputs): with an int64
accumulator the add moves 16 bytes per parameter instead of 8 and the in-memory kernel reached
about 0.33-0.41x memcpy bandwidth; with int32 about 0.46-0.5x, and the accumulator is one
model's size instead of two. Rounding to nearest (``np.rint`` before the conversion) costs one
more pass over the block (about 10 % of throughput), so the product is truncated toward zero in
the conversion itself: at most one unit instead of half a unit per contribution, still far
below float32 resolution at full scale. See ``benchmarks/aggregation.py`` for the end-to-end
number, which depends on machine load.

Overflow bound. Intermediate sums may wrap; only the true final sum must fit in int32, because
the int32 value read at the end is the true sum only if ``|true sum| < 2**31``. Every element
is checked ``|x| <= max_abs`` and the weights are checked ``sum w_k <= max_total_weight``; the
per-unit-weight scale ``C`` is the largest power of two with
``C * max_abs * max_total_weight <= 2**30``. Hence
``|true sum| <= max_abs * sum e_k <= 2**30 * (1 + 2**-24) < 2**31`` for any number of updates
(truncation toward zero never increases a magnitude).

Precision. The result is ``acc / E`` with ``E = sum e_k`` (an exactly rounded sum, order
independent). Against the exact weighted mean it errs by at most

    n / E                     truncating each contribution to an integer
  + 2**-22 * max_abs          float32 rounding of x*e_k, of e_k itself and of the result

which :attr:`FedAvgAccumulator.error_bound` reports. With the weights' total near
``max_total_weight`` the first term is about ``n * max_abs * 2**-30`` (e.g. 1e-8 for ten sites
and ``max_abs = 1``). The coordinator should therefore pass the round's planned total weight
(e.g. the sum of the sites' declared example counts, or 1.0 with weights given as shares); a
round in which only half of that weight reports has half the precision.

Streaming. :meth:`FedAvgAccumulator.begin` returns an :class:`UpdateStream` that takes the
update's safetensors bytes in chunks of any size: the 8-byte little-endian header length and the
JSON header are parsed as soon as they are complete and checked against the layout at once; the
data is then folded in block by block (``BLOCK`` elements, scratch buffers preallocated, so the
temporaries stay in L2) from ``np.frombuffer`` views of the chunks, each block checked for
NaN/Inf and range before it is added. An element split across two chunks is carried over.
To undo a stream the data it added must be seen again: the stream keeps references to the
chunks it folded (no copy when a chunk is ``bytes`` or a view of ``bytes``; a mutable buffer the
caller may reuse is copied) until :meth:`UpdateStream.finish` or :meth:`UpdateStream.abort`.

Float32 pieces (the common case) are folded with torch, whose kernels use every core
(intra-op parallelism) without a Python thread hand-off per chunk: on 2 cores that is what
brings streaming aggregation near memory bandwidth (``benchmarks/aggregation.py``). The
products and their truncation are IEEE-exact and the sum is integer, so the result is
bit-identical to the numpy path used for other dtypes and for undoing a stream.

Not thread-safe: use one accumulator from one thread (streams may interleave on it).
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch

from shared.aggregation.validation import (
    BLOCK,
    TensorLayout,
    check_block,
    check_keys,
    check_norm,
    check_range,
    check_structure,
    check_tensor_meta,
    check_update,
)
from shared.errors import PlanError, UpdateError

_FLOATS = ("float16", "float32", "float64")
_ST_DTYPES = {
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "BF16": "bfloat16",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}
_SUM_BITS = 30  # |true sum| <= 2**30 (+ rounding) < 2**31


class FedAvgAccumulator:
    """Streaming weighted FedAvg over one layout; memory one int32 per parameter.

    ``max_abs`` bounds every element of every update (``update.range``), ``max_total_weight``
    bounds the sum of the weights (``update.weight``), ``max_norm`` optionally bounds each
    update's L2 norm (``update.norm``). Together they fix the scale and hence the precision:
    see the module docstring. The norm is computed only when ``max_norm`` is set.
    """

    def __init__(
        self,
        layout: TensorLayout,
        *,
        max_abs: float = 16.0,
        max_total_weight: float = 1.0,
        max_norm: float | None = None,
    ) -> None:
        for what, v in (("max_abs", max_abs), ("max_total_weight", max_total_weight)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{what} must be a positive finite number, not {v!r}")
        self._layout = {n: (tuple(int(d) for d in s), str(dt)) for n, (s, dt) in layout.items()}
        self._slots: dict[str, tuple[int, int]] = {}  # name -> (start, size) in the flat acc
        start = 0
        for name, (shape, dtype) in self._layout.items():
            if dtype not in _FLOATS:
                raise PlanError(
                    f"Tensor {name!r} has dtype {dtype}; FedAvg averages float16/32/64 tensors "
                    "only. Leave integer buffers (e.g. num_batches_tracked) out of the update.",
                    code="plan.layout",
                )
            size = math.prod(shape)
            self._slots[name] = (start, size)
            start += size
        self.max_abs = float(max_abs)
        self.max_total_weight = float(max_total_weight)
        self.max_norm = max_norm
        self.scale = 2.0 ** math.floor(math.log2(2.0**_SUM_BITS / (max_abs * max_total_weight)))
        self._acc = np.zeros(start, dtype=np.int32)
        self._weights: list[float] = []  # committed w_k
        self._effective: list[float] = []  # committed e_k
        self._pending: dict[int, float] = {}  # id(stream) -> reserved weight
        self._tmp32 = np.empty(BLOCK, dtype=np.float32)
        self._tmp64 = np.empty(BLOCK, dtype=np.float64)  # result() only
        self._q = np.empty(BLOCK, dtype=np.int32)
        self._kernel = _TorchKernel()

    # --- public API -----------------------------------------------------------------

    @property
    def layout(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return dict(self._layout)

    @property
    def count(self) -> int:
        """Number of updates committed."""
        return len(self._weights)

    @property
    def total_weight(self) -> float:
        """Sum of the committed weights (exactly rounded, so independent of order)."""
        return math.fsum(self._weights)

    @property
    def error_bound(self) -> float:
        """Largest absolute difference of :meth:`result` from the exact weighted mean."""
        if not self._effective:
            return math.inf
        return self.count / math.fsum(self._effective) + 2.0**-22 * self.max_abs

    def add(
        self,
        update: Mapping[str, np.ndarray],
        weight: float,
        *,
        checked_abs: float | None = None,
    ) -> float | None:
        """Validate ``update`` and fold it in with ``weight``.

        Returns the update's L2 norm if this accumulator has a ``max_norm`` (it is computed to
        enforce the bound), else ``None``: the norm costs a dot product per block, and the
        coordinator's receipt check (:func:`~shared.aggregation.validate_update`) has already
        reported it. Nothing of an invalid update is added: validation runs over the whole
        update first. ``checked_abs``: the bound the caller has just checked every element of
        these very arrays against (the receipt check); when it is within ``max_abs`` and no
        norm bound applies, the values are not scanned a second time, only the names, shapes
        and dtypes (the fixed-point sum is exactly as safe: its scale rests on ``max_abs``).
        """
        e = self._effective_weight(weight)
        if checked_abs is not None and checked_abs <= self.max_abs and self.max_norm is None:
            check_structure(update, self._layout)
            norm = None
        else:
            norm = check_update(
                update, self._layout, max_abs=self.max_abs, max_norm=self.max_norm, want_norm=False
            )
        for name, (start, _size) in self._slots.items():
            self._fold(np.ascontiguousarray(update[name]).reshape(-1), start, e, +1)
        self._weights.append(float(weight))
        self._effective.append(float(e))
        return norm

    def begin(self, weight: float) -> UpdateStream:
        """Start receiving one update's safetensors bytes; see :class:`UpdateStream`."""
        e = self._effective_weight(weight)
        stream = UpdateStream(self, float(weight), e)
        self._pending[id(stream)] = float(weight)
        return stream

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean of the committed updates, float32, one array per tensor."""
        total = self._result_total()
        out: dict[str, np.ndarray] = {}
        for name, (start, size) in self._slots.items():
            arr = np.empty(size, dtype=np.float32)
            self._mean_into(start, size, total, arr)
            out[name] = arr.reshape(self._layout[name][0])
        return out

    def result_into(self, name: str, out: np.ndarray) -> None:
        """Tensor ``name`` of :meth:`result` (the same values), written into ``out``: flat,
        float32, of the tensor's size. For a caller that places it in a buffer of its own
        (the coordinator's encoded model) rather than in a fresh array."""
        start, size = self._slots[name]
        if out.dtype != np.float32 or out.shape != (size,):
            raise ValueError(f"{name!r} needs a flat float32 array of {size} elements")
        self._mean_into(start, size, self._result_total(), out)

    def _mean_into(self, start: int, size: int, total: float, out: np.ndarray) -> None:
        for i in range(0, size, BLOCK):
            m = min(BLOCK, size - i)
            t = self._tmp64[:m]
            np.divide(self._acc[start + i : start + i + m], total, out=t)
            out[i : i + m] = t

    def _result_total(self) -> float:
        """The sum of the effective weights, once :meth:`result` may be read."""
        if self._pending:
            raise UpdateError(
                f"{len(self._pending)} update stream(s) are still open; finish or abort them "
                "before reading the aggregate.",
                code="update.pending",
            )
        if not self._weights:
            raise UpdateError(
                "No update has been added, so there is nothing to average. Wait for at least "
                "one valid update (the round's quorum) before aggregating.",
                code="update.empty",
            )
        return math.fsum(self._effective)

    # --- internals ------------------------------------------------------------------

    def _effective_weight(self, weight: float) -> np.float32:
        w = float(weight)
        if not (math.isfinite(w) and w > 0):
            raise UpdateError(
                f"Update weight {weight!r} is not a positive finite number. Weight each update "
                "by its site's number of training examples (or its share of them).",
                code="update.weight",
            )
        total = math.fsum([*self._weights, *self._pending.values(), w])
        if total > self.max_total_weight * (1 + 1e-9):
            raise UpdateError(
                f"Adding weight {w:.6g} would bring the round's total weight to {total:.6g}, "
                f"beyond this accumulator's max_total_weight {self.max_total_weight:.6g}. "
                "Create the accumulator with the round's planned total weight.",
                code="update.weight",
            )
        e = np.float32(w * self.scale)
        if e < 1:
            raise UpdateError(
                f"Update weight {w:.6g} is too small for this accumulator's fixed-point scale "
                f"(it would count for less than one unit). Create the accumulator with a "
                "max_total_weight close to the round's planned total weight.",
                code="update.weight",
            )
        return e

    def _fold(self, x: np.ndarray, start: int, e: np.float32, sign: int) -> None:
        """acc[start : start + x.size] += sign * trunc(x * e), block by block, no checks."""
        op = np.add if sign > 0 else np.subtract
        acc, q = self._acc, self._q
        for i in range(0, x.size, BLOCK):
            xb = x[i : i + BLOCK]
            m = xb.size
            if xb.dtype.itemsize == 2:  # widen float16 exactly, as the stream does
                np.copyto(self._tmp32[:m], xb)
                xb = self._tmp32[:m]
            qb, ab = q[:m], acc[start + i : start + i + m]
            np.multiply(xb, e, out=qb, casting="unsafe")  # float product, truncated to int
            op(ab, qb, out=ab)


class UpdateStream:
    """One update arriving as safetensors bytes; created by :meth:`FedAvgAccumulator.begin`.

    ``feed(chunk)`` any number of times, then ``finish()`` to commit (returns the L2 norm, or
    ``None`` when the accumulator has no ``max_norm``) or ``abort()`` to drop. Any
    :class:`UpdateError` raised by ``feed`` or ``finish`` (bad header, wrong names/shapes/dtypes,
    NaN/Inf, range, norm, truncated or overlong data) leaves the accumulator exactly as before
    :meth:`~FedAvgAccumulator.begin`, and closes the stream.
    Usable as a context manager that aborts unless ``finish()`` was called.
    """

    def __init__(self, acc: FedAvgAccumulator, weight: float, e: np.float32) -> None:
        self._acc = acc
        self.weight = weight
        self._e = e
        self._state = "length"  # -> "header" -> "data" -> "complete"; or "committed"/"aborted"
        self._head = bytearray()
        self._header_len = 0
        self._segments: list[tuple[str, int, int, np.dtype[Any]]] = []  # file order
        self._data_len = 0
        self.received = 0  # bytes fed so far
        self._cursor: _Cursor | None = None
        self._kept: list[memoryview] = []  # data chunks folded so far, for abort
        self._folded = 0  # data bytes folded into the accumulator (element boundary)
        self._sumsq = 0.0
        self._max_header = 65536 + 1024 * len(acc._layout)

    @property
    def expected_size(self) -> int | None:
        """Total bytes of the update, known once its header has arrived."""
        if self._state in ("length", "header"):
            return None
        return 8 + self._header_len + self._data_len

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        self._check_open()
        try:
            mv = memoryview(chunk).cast("B")
            self.received += len(mv)
            if self._state == "length":
                mv = self._take_head(mv, 8)
                if self._state == "length" and len(self._head) == 8:
                    (self._header_len,) = struct.unpack("<Q", self._head)
                    if self._header_len > self._max_header:
                        raise _header_error(f"its header claims {self._header_len} bytes")
                    self._head.clear()
                    self._state = "header"
            if self._state == "header":
                mv = self._take_head(mv, self._header_len)
                if len(self._head) == self._header_len:
                    self._parse_header(bytes(self._head))
                    self._head.clear()
            if not len(mv):
                return
            if self._state != "data" or len(mv) > self._data_len - self._cursor_pos():
                raise UpdateError(
                    f"The update has more bytes than its header describes "
                    f"({self.received} received, {self.expected_size} expected). "
                    "Resend the update; check that one transfer carries one update.",
                    code="update.size",
                )
            owner = chunk.obj if isinstance(chunk, memoryview) else chunk
            if not isinstance(owner, bytes):
                mv = memoryview(bytes(mv))  # the caller may reuse a mutable buffer
            self._kept.append(mv)
            assert self._cursor is not None
            self._cursor.walk(mv, self._fold_checked)
            if self._cursor.pos == self._data_len:
                self._state = "complete"
        except BaseException:
            self._rollback()
            raise

    def finish(self) -> float | None:
        """Commit the update. Raises if the bytes are incomplete or the norm is too large.

        Returns the update's L2 norm if the accumulator has a ``max_norm``, else ``None`` (the
        norm is then not computed; see :meth:`FedAvgAccumulator.add`).
        """
        self._check_open()
        try:
            if self._state != "complete":
                total = self.expected_size
                raise UpdateError(
                    f"The update stream ended after {self.received} bytes"
                    + (f" of {total}" if total is not None else ", inside its header")
                    + ". The transfer was cut short; resend the update.",
                    code="update.truncated",
                )
            norm = None
            if self._acc.max_norm is not None:
                norm = math.sqrt(self._sumsq)
                check_norm(norm, self._acc.max_norm)
        except BaseException:
            self._rollback()
            raise
        acc = self._acc
        del acc._pending[id(self)]
        acc._weights.append(self.weight)
        acc._effective.append(float(self._e))
        self._state = "committed"
        self._kept = []
        return norm

    def abort(self) -> None:
        """Drop this update, leaving the accumulator as before ``begin``. Idempotent."""
        if self._state == "committed":
            raise UpdateError(
                "This update was already committed; it cannot be aborted any more.",
                code="update.closed",
            )
        self._rollback()

    def __enter__(self) -> UpdateStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state != "committed":
            self._rollback()

    # --- internals ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state in ("committed", "aborted"):
            raise UpdateError(
                f"This update stream is already {self._state}; start a new one with begin().",
                code="update.closed",
            )

    def _cursor_pos(self) -> int:
        return self._cursor.pos if self._cursor is not None else 0

    def _take_head(self, mv: memoryview, need: int) -> memoryview:
        take = min(need - len(self._head), len(mv))
        self._head += mv[:take]
        return mv[take:]

    def _parse_header(self, raw: bytes) -> None:
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _header_error("its header is not valid UTF-8 JSON") from exc
        if not isinstance(header, dict):
            raise _header_error("its header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not isinstance(meta, dict):
            raise _header_error("its __metadata__ is not a JSON object")
        for name, entry in header.items():
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("dtype"), str)
                and _int_list(entry.get("shape"))
                and _int_list(entry.get("data_offsets"))
                and len(entry["data_offsets"]) == 2
            ):
                raise _header_error(f"its entry for {name!r} is malformed")
        check_keys(header.keys(), self._acc._layout)
        placed = []
        for name, entry in header.items():
            st = entry["dtype"]
            dtype = _ST_DTYPES.get(st, st)
            check_tensor_meta(name, tuple(entry["shape"]), dtype, self._acc._layout)
            begin, end = entry["data_offsets"]
            placed.append((begin, end, name))
        placed.sort()
        pos = 0
        for begin, end, name in placed:
            start, size = self._acc._slots[name]
            dt = np.dtype(self._acc._layout[name][1])
            if begin != pos or end - begin != size * dt.itemsize:
                raise _header_error(f"the data offsets of {name!r} are inconsistent")
            pos = end
            if size:
                self._segments.append((name, start, size, dt))
        self._data_len = pos
        self._cursor = _Cursor(self._segments)
        self._state = "data" if pos else "complete"

    def _fold_checked(self, name: str, x: np.ndarray, start: int) -> None:
        """Check each block (NaN/Inf, range; norm if bounded) before adding it; count it.

        If a block fails, what was folded of this piece is subtracted again before the error
        propagates, so ``_folded`` still counts a prefix of the data (what :meth:`_rollback`
        undoes).
        """
        acc = self._acc
        n = x.size
        a = acc._acc[start : start + n]
        args = (name, self._e, acc.max_abs, acc.max_norm is not None)
        if x.dtype == np.float32 and n >= BLOCK:  # torch's per-call cost pays off on big pieces
            done, ss, err = acc._kernel.check_and_fold(x, a, *args)
        else:
            done, ss, err = _check_and_fold(x, a, *args, acc._q, acc._tmp32)
        if err is not None:
            if done:
                acc._fold(x[:done], start, self._e, -1)
            raise err
        self._sumsq += ss
        self._folded += n * x.dtype.itemsize

    def _rollback(self) -> None:
        if self._state in ("committed", "aborted"):
            return
        acc = self._acc
        remaining = self._folded
        undo = _Cursor(self._segments)

        def subtract(_name: str, x: np.ndarray, start: int) -> None:
            acc._fold(x, start, self._e, -1)

        for mv in self._kept:
            if remaining <= 0:
                break
            part = mv[:remaining]
            undo.walk(part, subtract)
            remaining -= len(part)
        self._kept = []
        self._folded = 0
        acc._pending.pop(id(self), None)
        self._state = "aborted"


def _check_and_fold(
    x: np.ndarray,
    a: np.ndarray,
    name: str,
    e: np.float32,
    max_abs: float,
    want_norm: bool,
    q: np.ndarray,
    tmp: np.ndarray,
) -> tuple[int, float, BaseException | None]:
    """``a += trunc(x * e)`` block by block, each block checked first (range, NaN/Inf, and
    the sum of squares if ``want_norm``).

    Returns (elements folded, sum of squares, the error that stopped it or None): it never
    raises, so a helper thread can report exactly how far it got.
    """
    dot, multiply, add = np.dot, np.multiply, np.add
    max_abs_sq = max_abs * max_abs
    widen = x.dtype.itemsize == 2
    ss = 0.0
    i = 0
    try:
        for i in range(0, x.size, BLOCK):
            xb = x[i : i + BLOCK]
            m = xb.size
            if widen:  # float16: exact, and numpy has no fast f16 dot
                np.copyto(tmp[:m], xb)
                xb = tmp[:m]
            # Fast path, one BLAS pass: every |x_i| <= ||block||, so a block whose sum of
            # squares is <= max_abs**2 is in range; NaN/Inf make the sum NaN/Inf and fail the
            # comparison. Only a block that fails (large norm, or bad values) pays for the
            # exact per-element check, which raises if and only if an element is bad.
            sq = float(dot(xb, xb))
            if not sq <= max_abs_sq:
                check_range(name, xb, max_abs)
            if want_norm:
                ss += sq if math.isfinite(sq) else check_block(name, xb, max_abs)
            qb = q[:m]
            multiply(xb, e, out=qb, casting="unsafe")  # float product, truncated to int
            add(a[i : i + m], qb, out=a[i : i + m])
    except BaseException as exc:  # handed to the caller, which re-raises it
        return i, ss, exc
    return x.size, ss, None


class _TorchKernel:
    """``a += trunc(x * e)`` for float32 pieces with torch, block by block, each checked first.

    Blocks of ``_TORCH_BLOCK`` elements: large enough for torch to split across cores, small
    enough to stay in L2. Same contract as :func:`_check_and_fold`.
    """

    def __init__(self) -> None:
        self._f = torch.empty(_TORCH_BLOCK, dtype=torch.float32)
        self._q = torch.empty(_TORCH_BLOCK, dtype=torch.int32)

    def check_and_fold(
        self,
        x: np.ndarray,
        a: np.ndarray,
        name: str,
        e: np.float32,
        max_abs: float,
        want_norm: bool,
    ) -> tuple[int, float, BaseException | None]:
        if x.flags.writeable:
            xt = torch.from_numpy(x)
        else:
            with warnings.catch_warnings():  # views of received bytes are read-only; we only
                warnings.simplefilter("ignore", UserWarning)  # read them
                xt = torch.from_numpy(x)
        at = torch.from_numpy(a)
        factor = float(e)
        max_abs_sq = max_abs * max_abs
        ss = 0.0
        i = 0
        try:
            for i in range(0, x.size, _TORCH_BLOCK):
                xb = xt[i : i + _TORCH_BLOCK]
                m = xb.numel()
                sq = float(torch.dot(xb, xb))  # fast path as in _check_and_fold
                if not sq <= max_abs_sq:
                    check_range(name, x[i : i + m], max_abs)
                if want_norm:
                    ss += sq if math.isfinite(sq) else check_block(name, x[i : i + m], max_abs)
                f, q = self._f[:m], self._q[:m]
                torch.mul(xb, factor, out=f)
                q.copy_(f)  # truncation toward zero, like numpy's unsafe cast
                at[i : i + m].add_(q)
        except BaseException as exc:
            return i, ss, exc
        return x.size, ss, None


_TORCH_BLOCK = 1 << 18


class _Cursor:
    """Walks the data section of a safetensors file chunk by chunk, tensor by tensor.

    Calls ``fn(name, x, start)`` with ``x`` a 1-D ``np.frombuffer`` view of whole elements and
    ``start`` their index in the flat accumulator; an element split across chunks is carried.
    """

    def __init__(self, segments: list[tuple[str, int, int, np.dtype[Any]]]) -> None:
        self._segments = segments
        self._seg = 0
        self._done = 0  # elements of the current segment already passed on
        self._carry = bytearray()
        self.pos = 0  # data bytes consumed

    def walk(self, mv: memoryview, fn: Any) -> None:
        pos, n = 0, len(mv)
        while pos < n:
            name, start, size, dt = self._segments[self._seg]
            isz = dt.itemsize
            if self._carry:
                take = min(isz - len(self._carry), n - pos)
                self._carry += mv[pos : pos + take]
                pos += take
                if len(self._carry) == isz:
                    fn(name, np.frombuffer(bytes(self._carry), dtype=dt), start + self._done)
                    self._carry.clear()
                    self._advance(1, size)
                continue
            k = min(size - self._done, (n - pos) // isz)
            if k:
                fn(name, np.frombuffer(mv, dtype=dt, count=k, offset=pos), start + self._done)
                pos += k * isz
                self._advance(k, size)
            else:
                self._carry += mv[pos:]
                pos = n
        self.pos += n

    def _advance(self, k: int, size: int) -> None:
        self._done += k
        if self._done == size:
            self._seg += 1
            self._done = 0


def _int_list(v: object) -> bool:
    return isinstance(v, list) and all(type(i) is int and i >= 0 for i in v)


def _header_error(what: str) -> UpdateError:
    return UpdateError(
        f"The update is not a valid safetensors file: {what}. "
        "Encode updates with shared's safetensors codec and resend.",
        code="update.header",
    )


def fedavg_reference(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Exact-as-float64 weighted mean, ``sum w_k x_k / sum w_k``, for tests and benchmarks."""
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    total = math.fsum(weights)
    out: dict[str, np.ndarray] = {}
    for name in updates[0]:
        s = np.zeros(np.shape(updates[0][name]), dtype=np.float64)
        for u, w in zip(updates, weights, strict=True):
            s += np.asarray(u[name], dtype=np.float64) * float(w)
        out[name] = s / total
    return out
