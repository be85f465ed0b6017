"""Versioned frame codec: JSON envelope plus an optional binary payload. Never pickle.

Frame layout (one websocket binary message)::

    magic  b"TSR"  | version u8 | header length u32 big-endian | header JSON | payload bytes

The header is ``{"type": ..., "id": ..., "body": {...}}``. ``decode`` raises only
``RemoteProtocolError`` whatever bytes it is given (proved by a hypothesis test), with codes
``protocol.malformed``, ``protocol.version``, ``protocol.too_large``, ``protocol.unknown_type``
and ``protocol.schema``.
"""

from __future__ import annotations

import json
import math
import struct
import uuid
from dataclasses import dataclass
from typing import Any, cast

from shared.errors import LocalProtocolError, RemoteProtocolError
from shared.protocol.messages import MESSAGE_TYPES, Message

PROTOCOL_VERSION = 1
MAGIC = b"TSR"
_PREFIX = struct.Struct(">3sBI")


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a peer may send. Chunks are at most ``max_payload_bytes``."""

    max_header_bytes: int = 256 * 1024
    max_payload_bytes: int = 4 * 1024 * 1024
    chunk_size: int = 1024 * 1024

    @property
    def max_frame_bytes(self) -> int:
        return _PREFIX.size + self.max_header_bytes + self.max_payload_bytes


DEFAULT_LIMITS = Limits()


def encode(message: Message, *, message_id: str | None = None) -> bytes:
    header = {
        "type": message.TYPE,
        "id": message_id or uuid.uuid4().hex,
        "body": message.body(),
    }
    try:
        raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except ValueError as exc:  # NaN or Inf in a float field is a bug on our side
        raise LocalProtocolError(f"cannot encode {message.TYPE}: {exc}") from exc
    return b"".join((_PREFIX.pack(MAGIC, PROTOCOL_VERSION, len(raw)), raw, message.payload_bytes))


def decode(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Message:
    data = bytes(data)
    if len(data) < _PREFIX.size:
        raise RemoteProtocolError("frame is shorter than its header", code="protocol.malformed")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise RemoteProtocolError("not a Tessera frame", code="protocol.malformed")
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"protocol version {version} is not supported (this side speaks "
            f"{PROTOCOL_VERSION}); update Tessera on the older side",
            code="protocol.version",
        )
    if header_len > limits.max_header_bytes:
        raise RemoteProtocolError("frame header is too large", code="protocol.too_large")
    end = _PREFIX.size + header_len
    if len(data) < end:
        raise RemoteProtocolError("frame is truncated", code="protocol.malformed")
    # A view, not a copy: a chunk's megabyte is hashed and stored where it lies (the frame,
    # immutable ``bytes``, lives as long as the view).
    payload = cast(bytes, memoryview(data)[end:])
    if len(payload) > limits.max_payload_bytes:
        raise RemoteProtocolError("frame payload is too large", code="protocol.too_large")
    header = _parse_header(data[_PREFIX.size : end])
    cls = MESSAGE_TYPES.get(header["type"])
    if cls is None:
        raise RemoteProtocolError(
            f"unknown message type {header['type'][:40]!r}", code="protocol.unknown_type"
        )
    try:
        return cls.from_body(header["body"], payload)
    except RemoteProtocolError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise RemoteProtocolError(f"{cls.TYPE}: {exc}", code="protocol.schema") from exc


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(
            raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError(
            "frame header is not valid JSON", code="protocol.malformed"
        ) from exc
    if (
        not isinstance(header, dict)
        or set(header) != {"type", "id", "body"}
        or not isinstance(header["type"], str)
        or not isinstance(header["id"], str)
        or not isinstance(header["body"], dict)
    ):
        raise RemoteProtocolError("frame header has the wrong shape", code="protocol.malformed")
    return header


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    """Floats like ``1e999`` parse to infinity, which we could never encode again."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range")
    return value
