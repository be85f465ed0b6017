"""Content-addressed blob files (models, updates), durable before they are acknowledged.

A blob is written to a temporary file in the same directory, fsynced, renamed into place
and the directory fsynced, so a crash leaves either the whole blob or none of it. A large blob
(a model) is hashed in a second thread while it is written, so that storing a round's model
takes the longer of the two rather than their sum, and written past the page cache where the
system allows (``shared.files.write_direct``). Once durable, large blobs leave the page cache
(``shared.files.drop_cached``): every round stores tens of MB that are rarely read again, and
a page cache growing by that much a round makes every write slower.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from shared.errors import StorageError
from shared.files import drop_cached, fsync_dir, start_writeback, write_direct, write_durably

PARALLEL_HASH_BYTES = 4 << 20  # below this, hashing first costs less than a thread
WRITE_SLICE = 4 << 20  # written, then sent on to the disk, while the rest is written


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
        if len(data) >= PARALLEL_HASH_BYTES:
            return self._put_large(data)
        digest = hashlib.sha256(data).hexdigest()
        if not self.has(digest):
            try:
                write_durably(self.path(digest), [data])
            except OSError as exc:
                raise StorageError(f"cannot store blob: {exc}", code="storage.write") from exc
        return digest

    def _put_large(self, data: bytes | memoryview) -> str:
        """``put``, hashing in a second thread while the bytes go to a temporary file (both
        release the GIL) and on to the disk slice by slice (``start_writeback``), so that
        the fsync finds little left to write; the file then moves into place under its
        digest."""
        tmp = self.partial / f"put-{threading.get_ident()}-{uuid.uuid4().hex}.part"
        with ThreadPoolExecutor(1) as pool:
            hashing = pool.submit(lambda: hashlib.sha256(data).hexdigest())
            try:
                if not write_direct(tmp, data):  # past the page cache: the caller holds them
                    self._write_cached(tmp, data)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise StorageError(f"cannot store blob: {exc}", code="storage.write") from exc
            digest = hashing.result()
        if self.has(digest):
            tmp.unlink(missing_ok=True)
        else:
            self.adopt(tmp, digest)
        return digest

    @staticmethod
    def _write_cached(tmp: Path, data: bytes | memoryview) -> None:
        """``_put_large``'s write where direct writes are not available."""
        with open(tmp, "wb") as fh:
            view = memoryview(data).cast("B")
            for lo in range(0, len(view), WRITE_SLICE):
                fh.write(view[lo : lo + WRITE_SLICE])
                fh.flush()
                start_writeback(fh.fileno(), lo, len(view[lo : lo + WRITE_SLICE]))
            os.fsync(fh.fileno())
            drop_cached(fh.fileno())  # the caller holds the bytes

    def adopt(self, path: Path, digest: str, *, drop_cache: bool = True) -> None:
        """Move a fully written, fsynced file of known digest into the store. ``drop_cache``:
        its pages leave the page cache (pass ``False`` for a blob read again soon)."""
        target = self.path(digest)
        new_dir = not target.parent.exists()
        try:
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            fsync_dir(target.parent)
            if new_dir:
                fsync_dir(self.root)
        except OSError as exc:
            raise StorageError(f"cannot store blob: {exc}", code="storage.write") from exc
        if drop_cache:
            self.drop_cached(digest)

    def drop_cached(self, digest: str) -> None:
        """Let a durable blob's pages leave the page cache (``shared.files.drop_cached``)."""
        with contextlib.suppress(OSError), open(self.path(digest), "rb") as fh:
            drop_cached(fh.fileno())

    def partial_path(self, name: str) -> Path:
        return self.partial / name
