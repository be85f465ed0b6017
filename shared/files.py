"""Writing files so that a crash or power cut leaves each one either absent or complete.

Both sides need it before they acknowledge anything: the coordinator for model and update
blobs, the site for objects pushed from its PACS.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def write_durably(path: Path, parts: Sequence[bytes | memoryview]) -> None:
    """Temporary file in the same folder, fsync, atomic rename, fsync the folder (and its
    parent when the folder is new). Raises ``OSError``; callers turn it into their error."""
    new_dir = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:40]}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            for part in parts:
                fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    if new_dir:
        fsync_dir(path.parent.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
