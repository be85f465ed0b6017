"""Canonical JSON: one byte string per value, so hashes and signatures are reproducible.

Sorted keys, no insignificant whitespace, UTF-8, no NaN/Infinity (RFC 8785 in spirit; our
values are str, int, bool, None, lists and dicts, plus floats written by ``repr``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_hash(value: Any) -> str:
    """Hex SHA-256 of a value's canonical JSON (plan identity, log entries)."""
    return sha256_hex(canonical_json(value))
