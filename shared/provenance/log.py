"""The coordinator's append-only provenance log and its signed tree heads (pure core).

Theory of operation
-------------------
Every event of a federation (charter published, site enrolled, plan approved, round opened,
update received, aggregate computed, ...) becomes a :class:`LogEntry`: its position in the log
(``index``), what happened (``kind``), when (``at``, seconds since the epoch, given by the
caller: the core reads no clock) and a JSON ``payload`` of hashes, identifiers and counts (never
patient data). The bytes that go into the Merkle tree are::

    canonical_json({"index": ..., "kind": ..., "at": ..., "payload": ...})

Putting the index inside the leaf makes position part of what is hashed: an entry cannot be
moved, and two entries with the same content at different places have different leaves.

A :class:`TreeHead` is the coordinator's signed statement "the log had ``size`` entries with
this Merkle ``root`` at ``timestamp``" (Ed25519, purpose ``tree_head``, see
:mod:`shared.crypto.signing`). Sites keep the heads they saw (:mod:`shared.provenance.witness`)
and ask for a consistency proof between the last one and each new one, so the coordinator can
add to history but cannot change it without the sites noticing.

:class:`ProvenanceLog` holds the entries and their leaf hashes in memory and answers for heads
and proofs. It knows nothing about storage: the coordinator stores the entries (and the heads it
signed) and rebuilds the log with ``ProvenanceLog(entries)``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from shared.canonical import canonical_json
from shared.crypto.signing import sign, verify
from shared.errors import CryptoError
from shared.provenance import merkle
from shared.provenance.errors import ProvenanceError

__all__ = ["TREE_HEAD_PURPOSE", "LogEntry", "ProvenanceLog", "TreeHead"]

TREE_HEAD_PURPOSE = "tree_head"

_KIND = re.compile(r"[a-z][a-z0-9._-]{0,63}")
_ROOT_HEX = re.compile(r"[0-9a-f]{64}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_float(value: object) -> float | None:
    """``value`` as a float if it is a finite int or float (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


# --- entries ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LogEntry:
    """One event in the log. ``payload`` is a private, JSON-normalised copy of what was given.

    Do not change ``payload`` in place: the leaf bytes are computed from it, so a changed
    payload no longer matches the hash the log holds and every check of it fails.
    """

    index: int
    kind: str
    at: float
    payload: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _is_int(self.index) or self.index < 0:
            raise ProvenanceError(
                f"A log entry's index must be a whole number from 0, not {self.index!r}. "
                "This is a bug in Tessera; please report it.",
                code="provenance.bad_entry",
            )
        if not isinstance(self.kind, str) or not _KIND.fullmatch(self.kind):
            raise ProvenanceError(
                f"Invalid log entry kind {self.kind!r}: use lower-case letters, digits, '.', "
                "'_' or '-'. This is a bug in Tessera; please report it.",
                code="provenance.bad_entry",
            )
        at = _finite_float(self.at)
        if at is None:
            raise ProvenanceError(
                f"A log entry's time must be a finite number of seconds, not {self.at!r}. "
                "This is a bug in Tessera; please report it.",
                code="provenance.bad_entry",
            )
        object.__setattr__(self, "at", at)  # 3 and 3.0 must give the same leaf bytes
        object.__setattr__(self, "payload", _normalised_payload(self.kind, self.payload))

    def leaf_bytes(self) -> bytes:
        """The exact bytes hashed into the Merkle tree."""
        return canonical_json(self.to_dict())

    def leaf_hash(self) -> bytes:
        return merkle.leaf_hash(self.leaf_bytes())

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "at": self.at, "payload": self.payload}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogEntry:
        """Inverse of :meth:`to_dict` (and of ``json.loads(leaf_bytes())``); strict on keys."""
        if not isinstance(data, Mapping) or set(data) != {"index", "kind", "at", "payload"}:
            raise ProvenanceError(
                "This is not a provenance log entry (it needs exactly index, kind, at and "
                "payload). The log or bundle it came from is damaged.",
                code="provenance.bad_entry",
            )
        return cls(index=data["index"], kind=data["kind"], at=data["at"], payload=data["payload"])


def _normalised_payload(kind: str, payload: object) -> dict[str, Any]:
    """A deep copy of ``payload`` as JSON would give it back, or ``ProvenanceError``.

    Going through canonical JSON both checks that the payload can be logged (str keys; str,
    int, finite float, bool, None, lists and dicts) and makes the entry independent of the
    caller's objects. Tuples become lists, as they would after storage.
    """
    if not isinstance(payload, Mapping):
        raise ProvenanceError(
            f"The payload of a {kind} log entry must be a mapping, not "
            f"{type(payload).__name__}. This is a bug in Tessera; please report it.",
            code="provenance.bad_entry",
        )
    if _has_non_string_key(payload):
        # json.dumps would turn an int key into a string: what is stored and read back would
        # not be what was logged.
        raise ProvenanceError(
            f"The payload of a {kind} log entry has a key that is not a string, so it would "
            "not read back as it was logged. This is a bug in Tessera; please report it.",
            code="provenance.bad_entry",
        )
    try:
        copy = json.loads(canonical_json(dict(payload)))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ProvenanceError(
            f"The payload of a {kind} log entry cannot be logged: {exc}. Use str, int, float, "
            "bool, None, lists and string-keyed dicts; encode bytes as hex first. This is a "
            "bug in Tessera; please report it.",
            code="provenance.bad_entry",
        ) from exc
    assert isinstance(copy, dict)
    return copy


def _has_non_string_key(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            if not all(isinstance(key, str) for key in item):
                return True
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


# --- tree heads ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TreeHead:
    """A signed tree head: ``size`` entries, Merkle ``root`` (64 hex digits), ``timestamp``.

    Building one checks its shape, not its signature: call :meth:`verify` with the
    coordinator's public key (a :class:`~shared.provenance.witness.Witness` does).
    """

    size: int
    root: str
    timestamp: float
    signature: str

    def __post_init__(self) -> None:
        if not _is_int(self.size) or self.size < 0:
            raise ProvenanceError(
                f"A tree head's size must be a whole number from 0, not {self.size!r}. The "
                "coordinator sent a damaged tree head.",
                code="provenance.bad_head",
            )
        if not isinstance(self.root, str) or not _ROOT_HEX.fullmatch(self.root):
            raise ProvenanceError(
                "A tree head's root must be 64 lower-case hex digits. The coordinator sent a "
                "damaged tree head.",
                code="provenance.bad_head",
            )
        timestamp = _finite_float(self.timestamp)
        if timestamp is None:
            raise ProvenanceError(
                f"A tree head's timestamp must be a finite number, not {self.timestamp!r}. "
                "The coordinator sent a damaged tree head.",
                code="provenance.bad_head",
            )
        object.__setattr__(self, "timestamp", timestamp)
        if not isinstance(self.signature, str):
            raise ProvenanceError(
                "A tree head's signature must be text. The coordinator sent a damaged tree head.",
                code="provenance.bad_head",
            )

    @property
    def root_bytes(self) -> bytes:
        return bytes.fromhex(self.root)

    def signed_fields(self) -> dict[str, Any]:
        """What the coordinator signs (purpose ``tree_head``)."""
        return {"size": self.size, "root": self.root, "timestamp": self.timestamp}

    @classmethod
    def create(
        cls, signing_key: Ed25519PrivateKey, *, size: int, root: bytes, timestamp: float
    ) -> TreeHead:
        """Sign a head for a tree of ``size`` leaves with Merkle ``root``."""
        if not isinstance(root, bytes) or len(root) != merkle.HASH_BYTES:
            raise ProvenanceError(
                "A tree head's root must be a 32-byte hash. This is a bug in Tessera; please "
                "report it.",
                code="provenance.bad_head",
            )
        unsigned = cls(size=size, root=root.hex(), timestamp=timestamp, signature="")
        signature = sign(signing_key, TREE_HEAD_PURPOSE, unsigned.signed_fields())
        return cls(size=size, root=root.hex(), timestamp=unsigned.timestamp, signature=signature)

    def verify(self, public_key: Ed25519PublicKey | str) -> None:
        """Return if the coordinator owning ``public_key`` signed this head, else raise.

        A wrong signature raises ``ProvenanceError`` (``provenance.bad_signature``); a public
        key that is not one raises ``CryptoError`` (``crypto.bad_public_key``), which is a
        problem with our own configuration, not with the head.
        """
        try:
            verify(public_key, TREE_HEAD_PURPOSE, self.signed_fields(), self.signature)
        except CryptoError as exc:
            if exc.code != "crypto.bad_signature":
                raise
            raise ProvenanceError(
                f"The coordinator's record of history (tree head of {self.size} entries) is "
                "not signed by the coordinator's key: it was changed on the way or comes from "
                "someone else. It was not accepted. If this happens again, stop taking part "
                "and contact the consortium lead.",
                code="provenance.bad_signature",
                size=self.size,
            ) from exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "root": self.root,
            "timestamp": self.timestamp,
            "signature": self.signature,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TreeHead:
        if not isinstance(data, Mapping) or set(data) != {"size", "root", "timestamp", "signature"}:
            raise ProvenanceError(
                "This is not a tree head (it needs exactly size, root, timestamp and "
                "signature). The coordinator sent a damaged tree head.",
                code="provenance.bad_head",
            )
        return cls(
            size=data["size"],
            root=data["root"],
            timestamp=data["timestamp"],
            signature=data["signature"],
        )


# --- the log ---------------------------------------------------------------------------------


class ProvenanceLog:
    """The entries of one federation's log, their leaf hashes, heads and proofs (in memory).

    ``ProvenanceLog(entries)`` rebuilds a log from stored entries; their indexes must be
    0, 1, 2, ... in order. Sizes default to the whole log; pass an earlier size to answer for
    an earlier head.
    """

    def __init__(self, entries: Iterable[LogEntry] = ()) -> None:
        self._entries: list[LogEntry] = []
        self._leaf_hashes: list[bytes] = []
        for entry in entries:
            if not isinstance(entry, LogEntry) or entry.index != len(self._entries):
                found = entry.index if isinstance(entry, LogEntry) else type(entry).__name__
                raise ProvenanceError(
                    f"The stored provenance log is out of order: entry {len(self._entries)} "
                    f"is missing (found {found!r} in its place). The log was damaged; restore "
                    "it from a backup and contact the consortium lead.",
                    code="provenance.bad_entry",
                    index=len(self._entries),
                )
            self._add(entry)

    def _add(self, entry: LogEntry) -> None:
        self._entries.append(entry)
        self._leaf_hashes.append(entry.leaf_hash())

    def append(self, kind: str, payload: Mapping[str, Any], at: float) -> LogEntry:
        """Add the next event; returns its entry (to be stored by the caller)."""
        entry = LogEntry(index=len(self._entries), kind=kind, at=at, payload=dict(payload))
        self._add(entry)
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> tuple[LogEntry, ...]:
        return tuple(self._entries)

    @property
    def leaf_hashes(self) -> tuple[bytes, ...]:
        return tuple(self._leaf_hashes)

    def _size(self, size: int | None, what: str) -> int:
        if size is None:
            return len(self._entries)
        if not _is_int(size) or not 0 <= size <= len(self._entries):
            raise ProvenanceError(
                f"The provenance log has {len(self._entries)} entries, so it cannot answer "
                f"for a {what} of {size!r}. This is a bug in Tessera; please report it.",
                code="provenance.out_of_range",
                size=size,
            )
        return size

    def root(self, size: int | None = None) -> bytes:
        """The Merkle root over the first ``size`` entries (all by default)."""
        return merkle.root(self._leaf_hashes[: self._size(size, "size")])

    def head(self, signing_key: Ed25519PrivateKey, now: float, size: int | None = None) -> TreeHead:
        """A tree head over the first ``size`` entries (all by default), signed at ``now``."""
        n = self._size(size, "size")
        return TreeHead.create(signing_key, size=n, root=self.root(n), timestamp=now)

    def inclusion(self, index: int, size: int | None = None) -> list[bytes]:
        """The proof that entry ``index`` is in the head of ``size`` entries."""
        n = self._size(size, "size")
        return merkle.inclusion_proof(index, self._leaf_hashes[:n])

    def consistency(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """The proof that the head of ``old_size`` entries is a prefix of ``new_size``."""
        n = self._size(new_size, "size")
        return merkle.consistency_proof(old_size, self._leaf_hashes[:n])
