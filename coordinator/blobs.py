"""Content-addressed blob files (models, updates), durable before they are acknowledged.

A blob is written to a temporary file in the same directory, fsynced, renamed into place
and the directory fsynced, so a crash leaves either the whole blob or none of it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from shared.errors import StorageError
from shared.files import fsync_dir, write_durably


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.partial = root / "partial"
        self.root.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def get(self, digest: str) -> bytes:
        try:
            data = self.path(digest).read_bytes()
        except OSError as exc:
            raise StorageError(
                f"blob {digest[:12]} is missing: {exc}", code="storage.blob"
            ) from exc
        if hashlib.sha256(data).hexdigest() != digest:
            raise StorageError(f"blob {digest[:12]} is corrupted on disk", code="storage.blob")
        return data

    def put(self, data: bytes | memoryview) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if not self.has(digest):
            try:
                write_durably(self.path(digest), [data])
            except OSError as exc:
                raise StorageError(f"cannot store blob: {exc}", code="storage.write") from exc
        return digest

    def adopt(self, path: Path, digest: str) -> None:
        """Move a fully written, fsynced file of known digest into the store."""
        target = self.path(digest)
        target.parent.mkdir(exist_ok=True)
        try:
            os.replace(path, target)
            fsync_dir(target.parent)
        except OSError as exc:
            raise StorageError(f"cannot store blob: {exc}", code="storage.write") from exc

    def partial_path(self, name: str) -> Path:
        return self.partial / name
