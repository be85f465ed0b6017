"""Named arrays <-> bytes, in the safetensors format (never pickle; DESIGN.md "Wire protocol").

Theory of operation: ``encode_tensors`` hands a key-sorted dict of C-contiguous arrays to
``safetensors.numpy.save``, which writes an 8-byte little-endian header length, a JSON header
(dtype, shape and byte range of each tensor, ordered by alignment then name) and the raw
little-endian data; equal inputs therefore give equal bytes, so a digest identifies a model.

``decode_tensors`` reads bytes from peers, so it parses them itself and checks every rule of the
format before it touches the data: header length within the buffer, strict JSON object without
duplicate names, known dtypes, non-negative shapes, byte ranges that match the shapes and tile
the data section exactly. Anything else raises ``UpdateError(code="update.malformed")`` and
nothing else (a hypothesis test feeds it random bytes). Reading with ``np.frombuffer`` after
those checks cannot run past the buffer, and avoids a native parser that could abort the process
on hostile input. Format: https://github.com/huggingface/safetensors#format
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors.numpy

from shared.canonical import sha256_hex
from shared.errors import UpdateError

# safetensors dtype tag <-> numpy dtype (little-endian). BF16 and F8 have no numpy type.
_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
_SUPPORTED_KINDS = {dtype.newbyteorder("=") for dtype in _DTYPES.values()}
_MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit
_METADATA_KEY = "__metadata__"
_MAX_DIMS = 32  # numpy allows 64
_MAX_ELEMENTS = 2**48
# Names that JSON writes the same in every encoder (no escapes): ``encode_parts`` builds the
# header itself only for these.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.:/\-]+")


def encode_tensors(
    arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise named arrays; the same names, dtypes, shapes and values always give the same
    bytes (keys are sorted; no metadata unless given: exported models carry their run, plan
    and tree head in it)."""
    prepared: dict[str, np.ndarray] = {}
    for name in sorted(arrays):
        if not isinstance(name, str) or not name or name == _METADATA_KEY:
            raise UpdateError(
                f"Tensor name {name!r} is not allowed: use a non-empty string other than "
                f"{_METADATA_KEY!r}.",
                code="update.keys",
            )
        array = np.asarray(arrays[name])
        if array.dtype.newbyteorder("=") not in _SUPPORTED_KINDS:
            raise UpdateError(
                f"Tensor {name!r} has dtype {array.dtype}, which cannot be sent; use float32 "
                "(or another fixed-size numeric dtype).",
                code="update.dtype",
            )
        # safetensors copies from the array's raw pointer: it must be C-contiguous.
        prepared[name] = array if array.flags.c_contiguous else array.copy(order="C")
    parts = None if metadata else encode_parts(prepared)
    if parts is not None:
        return b"".join(parts)
    return safetensors.numpy.save(prepared, metadata=dict(metadata) if metadata else None)


def encode_parts(arrays: Mapping[str, np.ndarray]) -> list[bytes | memoryview] | None:
    """The bytes ``encode_tensors`` gives for ``arrays`` (without metadata), as a header and
    one read-only view per array, for the common case of C-contiguous little-endian float32
    arrays with plain ASCII names; ``None`` otherwise. Why: ``safetensors.numpy.save`` copies
    each array twice (to ``bytes``, then into its output), which for a model of tens of MB is
    a good part of a round's aggregation; joining these parts copies once, and a writer can
    write and hash them without any copy. The layout is the format's: an 8-byte
    little-endian header length, the JSON header in the order of the data (float32 tensors
    sorted by name) padded with spaces to a multiple of 8, then the arrays' bytes."""
    f32 = np.dtype("<f4")
    names = sorted(arrays)
    if sys.byteorder != "little" or not all(
        isinstance(arrays[n], np.ndarray)
        and arrays[n].dtype == f32
        and arrays[n].flags.c_contiguous
        and _PLAIN_NAME.fullmatch(n)
        and n != _METADATA_KEY
        for n in names
    ):
        return None
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        size = arrays[name].nbytes
        header[name] = {
            "dtype": "F32",
            "shape": list(arrays[name].shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("ascii")
    raw += b" " * (-len(raw) % 8)
    parts: list[bytes | memoryview] = [struct.pack("<Q", len(raw)), raw]
    parts += [arrays[n].reshape(-1).view(np.uint8).data.toreadonly() for n in names]
    return parts


def read_metadata(data: bytes | bytearray | memoryview) -> dict[str, str]:
    """The ``__metadata__`` map of a safetensors payload ({} if none), checked like a decode."""
    _, header = _parse_header(memoryview(data).cast("B"))
    metadata = header.get(_METADATA_KEY) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _malformed("metadata is not a map of strings")
    return dict(metadata)


def tensor_digest(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of encoded tensors: the identity of a model or update payload."""
    return sha256_hex(data)


def _malformed(reason: str) -> UpdateError:
    return UpdateError(
        f"Tensor payload is malformed ({reason}); it was rejected. If it came from a peer, "
        "the peer runs an incompatible or faulty version.",
        code="update.malformed",
    )


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _malformed(f"duplicate name {key!r} in header")
        result[key] = value
    return result


def _reject_constant(token: str) -> Any:
    raise _malformed(f"non-JSON number {token} in header")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_header(data: memoryview) -> tuple[int, dict[str, Any]]:
    if len(data) < 8:
        raise _malformed("shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > _MAX_HEADER_BYTES or header_len > len(data) - 8:
        raise _malformed("header length exceeds the payload")
    try:
        text = bytes(data[8 : 8 + header_len]).decode("utf-8")
        header = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except UpdateError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _malformed("header is not valid UTF-8 JSON") from exc
    if not isinstance(header, dict):
        raise _malformed("header is not a JSON object")
    return 8 + header_len, header


def decode_tensors(
    data: bytes | bytearray | memoryview, *, copy: bool = True
) -> dict[str, np.ndarray]:
    """Parse safetensors bytes into writable native-endian arrays, checking everything first.

    ``copy=False``: the arrays are views into ``data`` wherever its byte order allows, so a
    model of tens of MB is not copied once more; they are writable only if ``data`` is (a
    ``bytearray`` read from a file, say) and keep it alive. Raises
    ``UpdateError(code="update.malformed")`` for any input that is not a well-formed
    payload, and no other exception.
    """
    view = memoryview(data).cast("B")
    data_start, header = _parse_header(view)
    metadata = header.pop(_METADATA_KEY, None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _malformed("metadata is not a map of strings")

    entries: list[tuple[int, int, str, np.dtype[Any], tuple[int, ...]]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _malformed(f"entry {name!r} is not {{dtype, shape, data_offsets}}")
        dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise _malformed(f"entry {name!r} has unsupported dtype {entry['dtype']!r}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (
            isinstance(shape, list)
            and len(shape) <= _MAX_DIMS
            and all(_is_int(d) and d >= 0 for d in shape)
            and math.prod(max(d, 1) for d in shape) < _MAX_ELEMENTS
        ):
            # The bound matters for empty tensors too: numpy refuses (0, 2**70) shapes.
            raise _malformed(f"entry {name!r} has an invalid shape")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise _malformed(f"entry {name!r} has invalid data offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
            raise _malformed(f"entry {name!r} byte range does not match its shape")
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))

    entries.sort(key=lambda e: (e[0], e[1]))
    position = 0
    for begin, end, name, _, _ in entries:
        if begin != position:
            raise _malformed(f"entry {name!r} leaves a gap or overlaps another")
        position = end
    if data_start + position != len(view):
        raise _malformed("data section length does not match the header")

    arrays: dict[str, np.ndarray] = {}
    for begin, _end, name, dtype, shape in entries:
        flat = np.frombuffer(view, dtype=dtype, count=math.prod(shape), offset=data_start + begin)
        arrays[name] = flat.reshape(shape).astype(dtype.newbyteorder("="), copy=copy)
    return arrays
